"""The DiT forward behind the compile-once strategies: units behind `lax.cond` on a traced mask.

Numerically the DiT of `l2c_jax.models.dit`, wired for one graph that serves
every cache schedule (the samplers that use it: `l2c_jax.sampling.strategies`):

- "scan": the blocks run under `jax.lax.scan` over parameters stacked on a
  leading axis, every sub-layer behind a `jax.lax.cond` on a traced mask
  array; the compile cost is that of one block.
- "cond": the blocks unrolled, each unit still behind `lax.cond`, the
  weights used in place (no copy).

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

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2c_jax.errors import ConfigError
from l2c_jax.models.dit import DiTConfig, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate
from l2c_jax.models.layers import Attention, Mlp, layer_norm
from l2c_jax.models.guidance import forward_with_cfg


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


def num_tokens(config: DiTConfig) -> int:
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

    Its `apply_cfg` is the original's `forward_with_cfg` (`l2c_jax.models.guidance`),
    so the sampler code of `l2c_jax.sampling.dit` runs on it as on a `Model`.
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
        rest, blocks = split_block_params(model.on_devices().params, self.config.depth, stack=stacked)
        if cast_params:
            rest, blocks = cast_floating(rest, self.dtype), cast_floating(blocks, self.dtype)
        self.params = {"rest": rest, "blocks": blocks}

    @property
    def num_units(self) -> int:
        return self.config.num_units

    def on_devices(self, mesh=None) -> "ScanModel":
        """Its arrays are the placed model's own (or copies made from them): nothing to place."""
        return self

    def apply(self, params, x, t, y=None, cache=None, mask=None, beta=None):
        if mask is None:
            mask = params.get("mask")
        return scan_apply(self.config, params, x, t, y, cache, mask, beta, dtype=self.dtype, unroll=self.unroll)

    def apply_cfg(self, params, x, t, y, cfg_scale, cache=None, mask=None, beta=None, guidance_channels=3):
        return forward_with_cfg(self.apply, self.config.in_channels, params, x, t, y, cfg_scale, cache, mask, beta,
                                guidance_channels)
