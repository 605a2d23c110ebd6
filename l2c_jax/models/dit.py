"""DiT (Peebles & Xie) in Flax, with the Learning-to-Cache unit cache.

Submodules carry the PyTorch attribute names (`blocks_3/attn/qkv` for
`blocks.3.attn.qkv`), so `l2c_jax.convert.rules` maps released checkpoints
without per-model tables. Inputs are NHWC latents.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from l2c_jax.errors import ConfigError, check_architecture, finite_number
from l2c_jax.models.cache import run_unit
from l2c_jax.models.layers import Attention, Mlp, PatchEmbed, layer_norm, sincos_pos_embed_2d, timestep_embedding

# name -> (depth, hidden_size, patch_size, num_heads), the twelve released shapes.
DIT_VARIANTS = {
    f"DiT-{size}/{p}": (depth, hidden, p, heads)
    for size, (depth, hidden, heads) in {
        "XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
    }.items()
    for p in (2, 4, 8)
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 means the table has a null-class row
    num_classes: int = 1000
    learn_sigma: bool = True
    # Numerics that differ between the original code (defaults) and diffusers' DiTTransformer2DModel
    # (freq_shift 1, mlp_norm_eps = its norm_eps, 1e-5): l2c_jax.convert.diffusers_dit.
    freq_shift: int = 0  # timestep embedding: exponent / (half - freq_shift)
    mlp_norm_eps: float = 1e-6  # the LayerNorm before each block's MLP

    def __post_init__(self):
        # A config.json edited by hand (a float depth, heads that do not divide the width) failed as a
        # reshape TypeError deep in the first forward.
        check_architecture("DiT", self, ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                         "num_heads"), zero_ok=("num_classes", "freq_shift"),
                           divides=(("num_heads", "hidden_size"), ("patch_size", "input_size")))
        if self.hidden_size % 4:
            raise ConfigError(f"DiT: hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos positions)")
        finite_number("DiT.mlp_ratio", self.mlp_ratio, low=0.0, low_open=True)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_units(self) -> int:
        return 2 * self.depth

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def num_labels(self) -> int:
        """The class labels a sample may carry (the null class not counted)."""
        return self.num_classes

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the null-class row guidance and dropped labels use (class dropout > 0)."""
        return self.class_dropout_prob > 0

    @classmethod
    def from_name(cls, name: str, **kw) -> "DiTConfig":
        depth, hidden, patch, heads = DIT_VARIANTS[name]
        return cls(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kw)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: jnp.dtype = jnp.float32
    freq_shift: int = 0

    @nn.compact
    def __call__(self, t):
        x = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift).astype(self.dtype)
        x = nn.Dense(self.hidden_size, dtype=self.dtype, name="mlp_0")(x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="mlp_2")(nn.silu(x))


class DiTBlock(nn.Module):
    """adaLN-Zero block; its attention and MLP outputs are units 2i and 2i+1."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    mlp_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, c, index: int, cache=None, mask=None, beta=None):
        mod = nn.Dense(6 * self.hidden_size, dtype=self.dtype, name="adaLN_modulation_1")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        def attn():
            h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa)
            return Attention(self.hidden_size, self.num_heads, qkv_bias=True, dtype=self.dtype, name="attn")(h)

        def mlp():
            h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
            return Mlp(int(self.hidden_size * self.mlp_ratio), self.hidden_size, approximate_gelu=True,
                       dtype=self.dtype, name="mlp")(h)

        attn_out = run_unit(self, 2 * index, attn, cache, mask, beta, self.dtype)
        x = x + gate_msa[:, None] * attn_out
        mlp_out = run_unit(self, 2 * index + 1, mlp, cache, mask, beta, self.dtype)
        x = x + gate_mlp[:, None] * mlp_out
        return x, (attn_out, mlp_out)


class FinalLayer(nn.Module):
    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(2 * self.hidden_size, dtype=self.dtype, name="adaLN_modulation_1")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x, 1e-6), shift, scale)
        return nn.Dense(self.patch_size ** 2 * self.out_channels, dtype=self.dtype, name="linear")(x)


class DiT(nn.Module):
    """`apply(params, x, t, y, cache, mask, beta) -> (out, new_cache)`; out is NHWC with out_channels."""

    config: DiTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y, cache=None, mask: Optional[tuple] = None, beta=None):
        cfg = self.config
        x = x.astype(self.dtype)
        b, hh, ww, _ = x.shape
        p = cfg.patch_size
        grid = cfg.input_size // p
        # The table is fixed in the original but stored in its checkpoints; it is a
        # parameter here so converted weights are used as they are.
        pos_embed = self.param("pos_embed", lambda *_: jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, grid))[None])
        tokens = PatchEmbed(cfg.hidden_size, p, dtype=self.dtype, name="x_embedder")(x)
        tokens = tokens + pos_embed.astype(self.dtype)

        temb = TimestepEmbedder(cfg.hidden_size, dtype=self.dtype, freq_shift=cfg.freq_shift, name="t_embedder")(t)
        table_rows = cfg.num_classes + int(cfg.has_null_class)
        yemb = LabelEmbedder(table_rows, cfg.hidden_size, dtype=self.dtype, name="y_embedder")(y)
        c = temb + yemb

        new_cache = []
        for i in range(cfg.depth):
            tokens, units = DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, dtype=self.dtype,
                                     mlp_norm_eps=cfg.mlp_norm_eps, name=f"blocks_{i}")(tokens, c, i, cache, mask, beta)
            new_cache.extend(units)

        out = FinalLayer(cfg.hidden_size, p, cfg.out_channels, dtype=self.dtype, name="final_layer")(tokens, c)
        # unpatchify: (B, h*w, p*p*C) -> (B, h*p, w*p, C), the original's nhwpqc order.
        out = out.reshape(b, hh // p, ww // p, p, p, cfg.out_channels)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, cfg.out_channels)
        return out.astype(jnp.float32), tuple(new_cache)


class LabelEmbedder(nn.Module):
    rows: int
    hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y):
        return nn.Embed(self.rows, self.hidden_size, dtype=self.dtype, name="embedding_table")(y)
