"""Execution strategies for DiT sampling: ahead-of-time static graphs and compile-once (scan / cond).

Two ways to run a cache schedule, both numerically the DiT of `l2c_jax.models.dit`:

- "static" (`StaticDiTSampler`, the design of `l2c_jax.sampling.dit`): one
  compiled graph per distinct step mask; a reused sub-layer is absent from its
  graph. Here every graph the schedule needs can be compiled *before*
  sampling, from a thread pool (`compile`), so XLA compiles them in parallel,
  and with the persistent compilation cache (`l2c_jax.compile_cache`) a
  second process loads them from disk.
- "scan" / "cond" (`ScanDiTSampler` over `l2c_jax.models.dit_scan.ScanModel`):
  every sub-layer sits behind a `jax.lax.cond` on a traced mask array. One
  graph serves every step of every schedule. On a CPU a skipped branch costs
  nothing; on a GPU a conditional may cost a round trip to the host per unit
  (see BENCHMARKS.md for the measured trade-off).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.memory import release_free_heap
from l2c_jax.models.dit_scan import ScanModel, num_tokens
from l2c_jax.sampling.dit import DiTSampler

STRATEGIES = ("static", "scan", "cond")


def _abstract(tree):
    # The placed weights' sharding is part of the compiled signature.
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if isinstance(a, jax.Array) else None),
        tree)


class _AOTMixin:
    """Ahead-of-time compilation of every step graph a schedule needs, in parallel.

    `compile(batch, masks)` lowers and compiles each distinct step signature
    from a thread pool (XLA compiles release the GIL) and keeps the
    executables; sampling then never compiles. Without `compile`, steps jit
    on first use as in `DiTSampler`.
    """

    def _aot_init(self):
        self._aot = {}
        self.compile_stats = {}

    def _step_keys(self, masks) -> list:
        raise NotImplementedError

    def _lower(self, key, batch: int):
        raise NotImplementedError

    def _batch_shapes(self, batch: int):
        cfg = self.model.config
        rows = batch * (2 if self.cfg_scale is not None else 1)
        x = jax.ShapeDtypeStruct((rows, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
        y = jax.ShapeDtypeStruct((rows,), jnp.int32)
        return x, y

    def _scale_abstract(self):
        return None if self.cfg_scale is None else jax.ShapeDtypeStruct((), jnp.float32)

    def step_keys(self, masks=None) -> list:
        """The distinct compiled graphs sampling with `masks` runs, in first-use order."""
        return self._step_keys(self.schedule(masks))

    def compile(self, batch: int, masks=None, workers: Optional[int] = None) -> dict:
        """Compiles every graph of the schedule for `batch` images; returns timing stats."""
        keys = [k for k in self.step_keys(masks) if (k, batch) not in self._aot]
        workers = max(1, int(workers or os.cpu_count() or 1))
        t0 = time.perf_counter()
        times = {}

        lower_times = {}

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
        stats = dict(graphs=len(keys), wall_s=time.perf_counter() - t0, workers=workers,
                     per_graph_s=sorted(times.values(), reverse=True), trace_lower_s=sum(lower_times.values()))
        self.compile_stats = stats
        return stats

    def _rows(self, x) -> int:
        return int(x.shape[0]) // (2 if self.cfg_scale is not None else 1)


class StaticDiTSampler(_AOTMixin, DiTSampler):
    """`DiTSampler` (one graph per distinct mask) with ahead-of-time, parallel compilation."""

    strategy = "static"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._aot_init()

    def _step_keys(self, schedule) -> list:
        keys, has_cache = [], False
        for s, m in enumerate(schedule):
            keep = s + 1 < len(schedule) and schedule[s + 1] is not None
            key = (m, keep, has_cache)
            if key not in keys:
                keys.append(key)
            has_cache = keep
        return keys

    def _lower(self, key, batch):
        mask, keep, has_cache = key
        x, y = self._batch_shapes(batch)
        cache = None
        if has_cache:
            cfg = self.model.config
            unit = jax.ShapeDtypeStruct((x.shape[0], num_tokens(cfg), cfg.hidden_size),
                                        self.cache_dtype or self.model.dtype)
            cache = (unit,) * cfg.num_units
        return super().step_fn(mask, keep).lower(_abstract(self.model.params), x, cache,
                                                 jax.ShapeDtypeStruct((), jnp.int32), y, None, self._scale_abstract())

    def step_fn(self, mask, keep_cache: bool):
        jitted = super().step_fn(mask, keep_cache)

        def run(params, x, cache, i, y, noise, cfg_scale):
            exe = self._aot.get(((mask, keep_cache, cache is not None), self._rows(x)))
            if exe is not None and noise is None:
                return exe(params, x, cache, i, y, None, cfg_scale)
            return jitted(params, x, cache, i, y, noise, cfg_scale)

        return run


class ScanDiTSampler(_AOTMixin, DiTSampler):
    """Compile-once sampling: `DiTSampler`'s loop over one graph with a traced mask.

    Same call as `DiTSampler.__call__(noise, y, masks=None, key=None, progress=False)`.
    stacked=True ("scan"): blocks under `lax.scan` over stacked weights (the
    smallest graph; a computed unit copies its weight slice). stacked=False
    ("cond"): the blocks unrolled, each unit still behind `lax.cond`, weights
    used in place (the static path's speed, one graph of the static full size).
    dtype: computation dtype (default the model's); cast_params stores the
    stacked weights in that dtype (halves their memory for bfloat16).
    The stacked weights are a second copy of the block parameters.
    """

    def __init__(self, model, steps: int, solver: str = "ddim", cfg_scale: Optional[float] = None,
                 eta: float = 0.0, respacing: Optional[str] = None, guidance_channels: Optional[int] = 3,
                 noise_schedule: str = "linear", dtype=None, unroll: int = 1, cast_params: bool = False,
                 stacked: bool = True, cache_dtype=None):
        self.strategy = "scan" if stacked else "cond"
        super().__init__(ScanModel(model, dtype=dtype, unroll=unroll, cast_params=cast_params, stacked=stacked),
                         steps, solver, cfg_scale, eta, respacing, guidance_channels, noise_schedule, cache_dtype)
        self._aot_init()
        self._mask_arrays = {}

    def _mask_array(self, mask):
        if mask not in self._mask_arrays:
            n = self.model.num_units
            self._mask_arrays[mask] = jnp.asarray(np.ones(n, bool) if mask is None else np.asarray(mask, bool))
        return self._mask_arrays[mask]

    def _step_keys(self, schedule) -> list:
        keys = ["scan"]
        if any(m is None for m in schedule) and self.solver == "ddpm":
            pass  # ddpm draws noise: the same single graph takes it as an argument
        return keys

    def _cache_shape(self, rows: int):
        cfg = self.model.config
        return (cfg.num_units, rows, num_tokens(cfg), cfg.hidden_size)

    def _bundle_abstract(self):
        n = self.model.num_units
        return dict(_abstract(self.model.params), mask=jax.ShapeDtypeStruct((n,), jnp.bool_))

    def _lower(self, key, batch):
        x, y = self._batch_shapes(batch)
        cache = jax.ShapeDtypeStruct(self._cache_shape(x.shape[0]), self.cache_dtype or self.model.dtype)
        return DiTSampler.step_fn(self, None, True).lower(self._bundle_abstract(), x, cache,
                                                         jax.ShapeDtypeStruct((), jnp.int32), y, None,
                                                         self._scale_abstract())

    def step_fn(self, mask, keep_cache: bool):
        # One graph for every mask; the cache is always carried (the next step may reuse it).
        jitted = DiTSampler.step_fn(self, None, True)
        marr = self._mask_array(mask)

        def run(params, x, cache, i, y, noise, cfg_scale):
            if cache is None:
                cache = jnp.zeros(self._cache_shape(x.shape[0]), self.cache_dtype or self.model.dtype)
            bundle = dict(params, mask=marr)
            exe = self._aot.get(("scan", self._rows(x)))
            if exe is not None and noise is None:
                return exe(bundle, x, cache, i, y, None, cfg_scale)
            return jitted(bundle, x, cache, i, y, noise, cfg_scale)

        return run


def make_sampler(model, steps: int, strategy: str = "static", **kw):
    """`StaticDiTSampler` or `ScanDiTSampler` (both accept DiTSampler's arguments)."""
    if strategy == "static":
        kw.pop("unroll", None), kw.pop("cast_params", None), kw.pop("dtype", None)
        return StaticDiTSampler(model, steps, **kw)
    if strategy in ("scan", "cond"):
        return ScanDiTSampler(model, steps, stacked=strategy == "scan", **kw)
    raise ConfigError(f"unknown execution strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def default_strategy(backend: Optional[str] = None) -> str:
    """The default execution strategy of a backend (BENCHMARKS.md has the numbers).

    CPU: "cond" (one graph, compiled in seconds and loaded from the persistent
    cache in about a second, steady state as fast as "static"). Other
    backends: "static" (no conditionals; not measured here: a conditional may
    cost a device-host round trip on a GPU).
    """
    backend = backend or jax.default_backend()
    return "cond" if backend == "cpu" else "static"
