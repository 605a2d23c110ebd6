"""Execution strategies for DiT sampling: compile-once (scan + cond) and ahead-of-time static graphs.

Two ways to run a cache schedule, both numerically the DiT of `l2c_jax.models.dit`:

- "static" (`StaticDiTSampler`, the design of `l2c_jax.sampling.dit`): one
  compiled graph per distinct step mask; a reused sub-layer is absent from its
  graph. Here every graph the schedule needs is compiled *before* sampling,
  from a thread pool (`compile_schedule`), so XLA compiles them in parallel,
  and with the persistent compilation cache (`enable_compilation_cache`) a
  second process loads them from disk.
- "scan" (`ScanDiTSampler`): the blocks run under `jax.lax.scan` over
  parameters stacked on a leading axis, and every sub-layer sits behind a
  `jax.lax.cond` on a traced mask array. One graph serves every step of every
  schedule, so the compile cost is that of one block, paid once. On a CPU a
  skipped branch costs nothing; on a GPU a conditional may cost a round trip
  to the host per unit (see BENCHMARKS.md for the measured trade-off).

The scan forward reuses the Flax submodules of `DiT` (`PatchEmbed`,
`TimestepEmbedder`, `LabelEmbedder`, `Attention`, `Mlp`, `FinalLayer`, applied to
their parameter subtrees) and `modulate` / `layer_norm`, so only the wiring
of a block is restated here; `tests/test_dit_scan.py` holds it to the static
path and to the original's fixtures.

Cache layout of the scan path: ONE array `(2*depth, B, tokens, width)` in
unit order (row 2i = attention of block i, 2i+1 its MLP), i.e. the static
path's tuple stacked. `cache_to_tuple` / `cache_from_tuple` convert; the
scan forward accepts either form and returns the stacked array.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.compile_cache import enable_compilation_cache  # noqa: F401  (its old home)
from l2c_jax.errors import ConfigError
from l2c_jax.models.dit import DiTConfig, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate
from l2c_jax.models.layers import Attention, Mlp, layer_norm
from l2c_jax.sampling.dit import DiTSampler

STRATEGIES = ("static", "scan", "cond")


# --------------------------------------------------------------------------- parameters and cache layout
def split_block_params(params, depth: int, stack: bool = True):
    """(params without `blocks_*`, the blocks' params stacked for the scan).

    The attention and MLP weights are stacked on a leading axis of size depth
    (`blocks["attn"]`, `blocks["mlp"]`). The adaLN weights of all blocks are
    concatenated along their output axis instead (`kernel` (width, depth*6*width),
    `bias` (depth*6*width,)), so every block's modulation comes from one plain
    matmul outside the loop, without slicing or transposing a weight copy.
    Call it once, outside jit: the result is a copy of the block weights.
    Works on arrays and on `jax.ShapeDtypeStruct` trees (via `jax.eval_shape`).
    """
    missing = [f"blocks_{i}" for i in range(depth) if f"blocks_{i}" not in params]
    if missing:
        raise ConfigError(f"DiT params lack {', '.join(missing)}")
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    blocks = [params[f"blocks_{i}"] for i in range(depth)]

    def build(*bs):
        if stack:
            out = {name: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[b[name] for b in bs])
                   for name in bs[0] if name != "adaLN_modulation_1"}
        else:
            out = {name: [b[name] for b in bs] for name in bs[0] if name != "adaLN_modulation_1"}
        ada = [b["adaLN_modulation_1"] for b in bs]
        if not stack:  # the blocks' own adaLN weights: a concatenated copy costs 0.9 GB at XL size
            out["adaLN_modulation_1"] = ada
            return out
        out["adaLN_modulation_1"] = dict(kernel=jnp.concatenate([a["kernel"] for a in ada], axis=-1),
                                         bias=jnp.concatenate([a["bias"] for a in ada], axis=-1))
        return out

    leaves = jax.tree_util.tree_leaves(params)
    if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
        return rest, jax.eval_shape(build, *blocks)
    if stack:
        return rest, jax.jit(build)(*blocks)
    out = build(*blocks)  # lists of the blocks' own arrays + the concatenated adaLN
    return rest, out


def cast_floating(tree, dtype):
    """Casts the floating leaves of a pytree (e.g. parameters to bfloat16)."""
    def cast(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(a.shape, dtype) if isinstance(a, jax.ShapeDtypeStruct) else a.astype(dtype)
        return a
    return jax.tree_util.tree_map(cast, tree)


def cache_from_tuple(cache):
    """The static path's tuple of 2*depth (B, T, W) arrays -> one stacked (2*depth, B, T, W) array."""
    return None if cache is None else jnp.stack(tuple(cache))


def cache_to_tuple(cache):
    """Stacked (2*depth, B, T, W) -> the tuple contract of `l2c_jax.models.cache`."""
    return None if cache is None else tuple(cache[k] for k in range(cache.shape[0]))


def _tokens(config: DiTConfig) -> int:
    return (config.input_size // config.patch_size) ** 2


# --------------------------------------------------------------------------- the scanned forward
def scan_apply(config: DiTConfig, params, x, t, y, cache=None, mask=None, beta=None, dtype=jnp.float32,
               unroll: int = 1):
    """DiT forward with the blocks under `lax.scan` and each unit behind `lax.cond`.

    params: {"rest": params without blocks_*, "blocks": stacked block params}
      (see `split_block_params`).
    cache: None (zeros: only valid when every unit computes), the stacked
      (2*depth, B, T, W) array, or the static path's tuple.
    mask: None (compute all, no conditionals) or a (2*depth,) bool array,
      traced or not: True = compute, False = reuse the cached output.
    beta: None or (2*depth,) weights: computed units become
      beta*computed + (1-beta)*cached (router training).
    Returns (out NHWC float32 with out_channels, stacked cache (2*depth, B, T, W) in `dtype`).
    """
    cfg = config
    rest, blocks = params["rest"], params["blocks"]
    hidden, p, depth = cfg.hidden_size, cfg.patch_size, cfg.depth
    x = jnp.asarray(x).astype(dtype)
    b, hh, ww, _ = x.shape

    tokens = PatchEmbed(hidden, p, dtype=dtype).apply({"params": rest["x_embedder"]}, x)
    tokens = tokens + rest["pos_embed"].astype(dtype)
    temb = TimestepEmbedder(hidden, dtype=dtype).apply({"params": rest["t_embedder"]}, t)
    rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
    yemb = LabelEmbedder(rows, hidden, dtype=dtype).apply({"params": rest["y_embedder"]}, y)
    c = temb + yemb
    n = tokens.shape[1]

    if isinstance(cache, (tuple, list)):
        cache = cache_from_tuple(cache)
    if cache is None:
        if beta is not None:
            raise ConfigError("beta interpolates with the cache, but no cache was given")
        cache = jnp.zeros((2 * depth, b, n, hidden), dtype)
    elif cache.shape != (2 * depth, b, n, hidden):
        raise ConfigError(f"cache has shape {tuple(cache.shape)}, expected {(2 * depth, b, n, hidden)}")
    cache = cache.astype(dtype).reshape(depth, 2, b, n, hidden)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.shape != (2 * depth,):
            raise ConfigError(f"mask has shape {tuple(mask.shape)}, the model has {2 * depth} cacheable sub-layers")
        mask = mask.reshape(depth, 2)
    if beta is not None:
        beta = jnp.asarray(beta).reshape(depth, 2)

    attn_mod = Attention(hidden, cfg.num_heads, qkv_bias=True, dtype=dtype)
    mlp_mod = Mlp(int(hidden * cfg.mlp_ratio), hidden, approximate_gelu=True, dtype=dtype)
    if isinstance(blocks["adaLN_modulation_1"], (list, tuple)):  # "cond": each block's own weights
        ada = nn.Dense(6 * hidden, dtype=dtype)
        mods = jnp.stack([ada.apply({"params": w}, nn.silu(c)) for w in blocks["adaLN_modulation_1"]])
    else:
        # adaLN of every block in one matmul (weights concatenated by `split_block_params`).
        mods = nn.Dense(depth * 6 * hidden, dtype=dtype).apply({"params": blocks["adaLN_modulation_1"]},
                                                               nn.silu(c))
        mods = mods.reshape(b, depth, 6 * hidden).transpose(1, 0, 2)

    def unit(flag, compute, cached, bval):
        def run(_):
            out = compute().astype(dtype)
            if bval is not None:
                bb = bval.astype(dtype)
                out = bb * out + (1 - bb) * cached
            return out
        if flag is None:
            return run(None)
        return jax.lax.cond(flag, run, lambda _: cached, None)

    unrolled = isinstance(blocks["attn"], (list, tuple))

    def block_params(name, i):
        if unrolled:  # the block's own arrays: no copy at all
            return blocks[name][i]
        # Sliced inside the unit's branch: a skipped unit does not even copy its weights.
        return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), blocks[name])

    def body(h, xs):
        i, mod, m, cpair, bpair = xs
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        a = unit(None if m is None else m[0],
                 lambda: attn_mod.apply({"params": block_params("attn", i)},
                                        modulate(layer_norm(h, 1e-6), shift_msa, scale_msa)),
                 cpair[0], None if bpair is None else bpair[0])
        h = h + gate_msa[:, None] * a
        f = unit(None if m is None else m[1],
                 lambda: mlp_mod.apply({"params": block_params("mlp", i)},
                                       modulate(layer_norm(h, 1e-6), shift_mlp, scale_mlp)),
                 cpair[1], None if bpair is None else bpair[1])
        h = h + gate_mlp[:, None] * f
        return h, jnp.stack([a, f])

    xs = (jnp.arange(depth), mods, mask, cache, beta)
    if unrolled:
        # "cond" layout: a Python loop over the blocks, each unit still behind lax.cond on the
        # traced mask, so one graph serves every schedule; the weights are used in place.
        ys = []
        for i in range(depth):
            tokens, y_i = body(tokens, (i,) + jax.tree_util.tree_map(lambda a: a[i], (mods, mask, cache, beta)))
            ys.append(y_i)
        new_cache = jnp.stack(ys)
    else:
        tokens, new_cache = jax.lax.scan(body, tokens, xs, length=depth, unroll=unroll)

    out = FinalLayer(hidden, p, cfg.out_channels, dtype=dtype).apply({"params": rest["final_layer"]}, tokens, c)
    out = out.reshape(b, hh // p, ww // p, p, p, cfg.out_channels)
    out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, cfg.out_channels)
    return out.astype(jnp.float32), new_cache.reshape(2 * depth, b, n, hidden)


class ScanModel:
    """A `Model` look-alike whose `apply` is `scan_apply`; `params` = {"rest", "blocks"}.

    It lends `Model.apply_cfg` (the original's `forward_with_cfg`) unchanged, so
    the sampler code of `l2c_jax.sampling.dit` runs on it as on a `Model`.
    The traced mask travels inside the params bundle (key "mask"), which keeps
    the sampler's static `mask` argument None: one graph for all steps.
    """

    family = "dit"

    def __init__(self, model, dtype=None, unroll: int = 1, cast_params: bool = False, stacked: bool = True):
        if model.family != "dit":
            raise ConfigError(f"the scan strategy runs DiT models, got {model.family}")
        self.config = model.config
        self.dtype = jnp.dtype(dtype or model.dtype)
        self.unroll = int(unroll)
        rest, blocks = split_block_params(model.params, self.config.depth, stack=stacked)
        if cast_params:
            rest, blocks = cast_floating(rest, self.dtype), cast_floating(blocks, self.dtype)
        self.params = {"rest": rest, "blocks": blocks}

    @property
    def num_units(self) -> int:
        return self.config.num_units

    def apply(self, params, x, t, y=None, cache=None, mask=None, beta=None):
        if mask is None:
            mask = params.get("mask")
        return scan_apply(self.config, params, x, t, y, cache, mask, beta, dtype=self.dtype, unroll=self.unroll)

    def apply_cfg(self, params, x, t, y, cfg_scale, cache=None, mask=None, beta=None, guidance_channels=3):
        from l2c_jax.model import Model
        return Model.apply_cfg(self, params, x, t, y, cfg_scale, cache, mask, beta, guidance_channels)


# --------------------------------------------------------------------------- samplers
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
            unit = jax.ShapeDtypeStruct((x.shape[0], _tokens(cfg), cfg.hidden_size),
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
        if hasattr(model, "on_devices"):
            model.on_devices()
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
        return (cfg.num_units, rows, _tokens(cfg), cfg.hidden_size)

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
