"""What every sampler shares: the execution strategy, compiled steps kept per graph, ahead-of-time compilation.

Two strategies run a cache schedule, both through the model's one definition
(`l2c_jax.models.cache.run_unit`):

- "static": the step mask is static, so every distinct mask compiles once
  and a reused sub-layer is absent from its graph.
- "cond": the mask is a traced array, every unit sits behind `lax.cond`; ONE
  graph serves every step of every schedule and the cache is always carried.
  A skipped branch costs nothing measurable on the CPU or on an H200 (the
  conditional stays on the device; docs/performance.md has the numbers).

A family's sampler says which graph each model evaluation runs (`_plan`: a
key per evaluation) and how to lower one (`_lower`); this base keeps the
jitted functions, builds the traced mask arrays, compiles every graph of a
schedule ahead of time from a thread pool (`compile`) and hands the heap a
compile freed back to the OS.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.memory import release_free_heap

STRATEGIES = ("static", "cond")


def resolve_strategy(strategy: Optional[str], backend: Optional[str] = None) -> str:
    """A strategy name, with "auto" resolved to the backend's measured default (docs/performance.md).

    CPU and GPU: "cond". One graph: on the 2-core CPU it compiles in seconds
    and loads from the persistent cache in about a second; on an H200 (DiT-XL/2,
    DDIM 20, batch 64, float32) it compiled in 21 s against 98 s for the 8
    static graphs and sampled within 0.5% of "static". Other backends (TPU,
    not measured): "static", no conditionals.
    """
    if strategy in (None, "", "auto"):
        return "cond" if (backend or jax.default_backend()) in ("cpu", "gpu", "cuda", "rocm") else "static"
    if strategy == "scan":
        raise ConfigError("the 'scan' strategy was removed (it measured 8-12% slower than 'cond' and could not "
                          "drop units statically); use 'cond' for one graph, or 'static'")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown execution strategy {strategy!r} (known: auto, {', '.join(STRATEGIES)})")
    return strategy


def abstract(tree):
    """ShapeDtypeStructs of a tree; a placed array's sharding is part of the compiled signature."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if isinstance(a, jax.Array) else None),
        tree)


def call_scale(built, given, off_value: float):
    """One call's guidance scale: `given` ("default": the sampler's own `built`), None when guidance is off.

    Guidance on or off changes the graph (the batch doubles), so a sampler built
    one way refuses the other; any scale of the same kind is only an argument.
    """
    if isinstance(given, str) and given == "default":
        return built
    off = given is None or float(given) == off_value
    if off != (built is None):
        raise ConfigError("this sampler was built " + ("without" if built is None else "with")
                          + f" classifier-free guidance; build another for cfg_scale={given!r}")
    return None if off else float(given)


def cast_cache(cache, dtype):
    """The feature cache (a pytree, or None) in `dtype` (None: unchanged)."""
    if cache is None or dtype is None:
        return cache
    return jax.tree.map(lambda a: a.astype(dtype), cache)


def computed_share(masks: Optional[Sequence], steps: int, num_units: int) -> float:
    """Share of sub-layer evaluations a schedule computes (1.0 without a cache)."""
    if masks is None:
        return 1.0
    m = np.asarray(masks, dtype=bool)
    return float(m.sum()) / float(steps * num_units)


class Sampler:
    """The shared machinery; a family's sampler defines `_plan`, `_build` and `_lower`.

    Keys: `_plan(schedule)` gives, per model evaluation, the hashable key of
    the graph it runs ((mask, keep, has_cache, ...) for "static", a constant
    for "cond"). `_build(key)` returns the jitted function of that key,
    `_lower(key, batch)` its lowering for `batch` images.
    """

    family = ""
    guidance_off = 1.0  # the scale at which guidance is the identity
    default_solver = ""
    # Jobs' names for a step count: router keys ("ddim50", "dpm20") and labels ("DDIM 50", "NFE 20").
    rows_prefix, rows_label = "", ""
    step_multiple = 1  # model evaluations a solver step makes: a step count is a multiple of it
    strategy = "static"
    draws_noise = False  # True where a call needs a PRNG key (ancestral steps)
    compile_ahead = True  # whether jobs compile a schedule's graphs before sampling (`compile`)

    @classmethod
    def options_from_config(cls, sampler_config) -> dict:
        """The constructor options a job's `config.sampler` sets for this family."""
        return {}

    def describe(self) -> tuple:
        """(what one sample runs, what the computed share counts), for reports."""
        raise NotImplementedError

    def evaluation_masks(self, masks) -> np.ndarray:
        """A schedule's masks as one row per model evaluation (a family whose rows differ overrides)."""
        return np.asarray(masks, bool)

    def check_router_masks(self, masks):
        """A router's masks as this sampler's schedule rows (one per model evaluation); refuses what it cannot
        run (a family with its own rule overrides)."""
        return masks

    def _init_steps(self, strategy: str, cache_dtype=None):
        # "auto" may still choose per schedule (DiT: forecasting schedules run static graphs).
        self.auto_strategy = strategy in (None, "", "auto")
        self.strategy = resolve_strategy(strategy)
        self.cache_dtype = None if cache_dtype is None else jnp.dtype(cache_dtype)
        self._compiled = {}
        self._signatures = set()  # (key, input shape) pairs already compiled by the jitted functions
        self._aot = {}
        self._mask_arrays = {}
        self.compile_stats = {}

    # ------------------------------------------------------------------ keys and functions
    def _plan(self, schedule) -> list:
        raise NotImplementedError

    def _build(self, key) -> Callable:
        raise NotImplementedError

    def _lower(self, key, batch: int):
        raise NotImplementedError

    def _rows(self, x) -> int:
        raise NotImplementedError

    def mask_arg(self, mask, strategy: Optional[str] = None):
        """The traced mask array of "cond" (kept per mask), None for "static" (the mask is in the key)."""
        if (strategy or self.strategy) != "cond":
            return None
        if mask not in self._mask_arrays:
            n = self.model.num_units
            self._mask_arrays[mask] = jnp.asarray(np.ones(n, bool) if mask is None else np.asarray(mask, bool))
        return self._mask_arrays[mask]

    def function(self, key) -> Callable:
        """The jitted function of a key (built on first use, then kept)."""
        if key not in self._compiled:
            self._compiled[key] = self._build(key)
        return self._compiled[key]

    def run(self, key, *args, aot_ok: bool = True):
        """Runs one evaluation: the ahead-of-time executable if compiled, else the jitted function.

        The key and the input's shape fix every other argument's shape, so a new
        (key, shape) pair is exactly a call that compiles; after one, the heap the
        compile freed is handed back (`release_free_heap`).
        """
        exe = self._aot.get((key, self._rows(args[1]))) if aot_ok else None
        if exe is not None:
            return exe(*args)
        signature = (key, tuple(args[1].shape))
        out = self.function(key)(*args)
        if signature not in self._signatures:
            self._signatures.add(signature)
            release_free_heap()
        return out

    # ------------------------------------------------------------------ ahead of time
    def step_keys(self, masks=None) -> list:
        """The distinct compiled graphs sampling with `masks` runs, in first-use order."""
        keys = []
        for k in self._plan(self.schedule_of(masks)):
            if k not in keys:
                keys.append(k)
        return keys

    def compile(self, batch: int, masks=None, workers: Optional[int] = None) -> dict:
        """Compiles every graph of the schedule for `batch` images, in parallel; returns timing stats."""
        keys = [k for k in self.step_keys(masks) if (k, batch) not in self._aot]
        workers = max(1, int(workers or os.cpu_count() or 1))
        t0 = time.perf_counter()
        times, lower_times = {}, {}

        def one(key):
            s = time.perf_counter()
            lowered = self._lower(key, batch)  # tracing + lowering (Python, holds the GIL)
            lower_times[key] = time.perf_counter() - s
            exe = lowered.compile()  # XLA, or a persistent-cache hit (releases the GIL)
            times[key] = time.perf_counter() - s
            return key, exe

        if workers == 1 or len(keys) <= 1:
            results = [one(k) for k in keys]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(keys))) as pool:
                results = list(pool.map(one, keys))
        for key, exe in results:
            self._aot[(key, batch)] = exe
        release_free_heap()  # what the compiles freed (l2c_jax.memory)
        self.compile_stats = dict(graphs=len(keys), wall_s=time.perf_counter() - t0, workers=workers,
                                  per_graph_s=sorted(times.values(), reverse=True),
                                  trace_lower_s=sum(lower_times.values()))
        return self.compile_stats
