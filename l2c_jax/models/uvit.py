"""U-ViT (Bao et al.) in Flax, with the Learning-to-Cache unit cache.

The time (and label) conditions are tokens in the sequence; blocks are plain
pre-norm transformer blocks; the output half of the network receives long
skip connections from the input half (`skip_linear(concat([x, skip]))`).

Submodules carry the PyTorch attribute names (`in_blocks_3/attn/qkv` for
`in_blocks.3.attn.qkv`, `time_embed_0` for `time_embed.0`), so
`l2c_jax.convert.rules` maps released checkpoints without per-model tables.
Inputs and outputs are NHWC.

Cache columns (as the original `uvit_router.py` / `uvit_dynamic.py` count
them): blocks are numbered in execution order, in_blocks first, then the mid
block, then out_blocks; block j owns column 2j (attention branch output) and
2j+1 (MLP branch output), both as added to the residual stream. U-ViT-H/2
(depth 28) has 14 + 1 + 14 = 29 blocks, 58 columns.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from l2c_jax.errors import ConfigError, check_architecture, finite_number
from l2c_jax.models.cache import run_unit
from l2c_jax.models.layers import Attention, LayerNorm, Mlp, PatchEmbed, timestep_embedding

# name -> (embed_dim, depth, num_heads, patch_size): the released U-ViT class-
# conditional / unconditional image models (baofff/U-ViT configs/*.py):
#   S/2 CIFAR-10, S/4 CelebA-64, M/4 and L/4 ImageNet-64, L/2 and H/2 ImageNet-256
#   (latent 32), L/4 and H/4 ImageNet-512 (latent 64).
UVIT_VARIANTS = {
    "U-ViT-S/2": (512, 12, 8, 2),
    "U-ViT-S/4": (512, 12, 8, 4),
    "U-ViT-M/4": (768, 16, 12, 4),
    "U-ViT-L/2": (1024, 20, 16, 2),
    "U-ViT-L/4": (1024, 20, 16, 4),
    "U-ViT-H/2": (1152, 28, 16, 2),
    "U-ViT-H/4": (1152, 28, 16, 4),
}


@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """The original `UViT(...)` constructor arguments; defaults are U-ViT-H/2 at ImageNet 256."""

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    num_classes: int = 1001  # rows of the label table (incl. the null class); <= 0: unconditional
    use_checkpoint: bool = False  # gradient checkpointing in the original; ignored here
    conv: bool = False  # final 3x3 conv (the original's constructor default is True)
    skip: bool = True  # long skips into the out blocks

    def __post_init__(self):
        check_architecture("U-ViT", self, ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"),
                           zero_ok=("num_classes",),
                           divides=(("num_heads", "embed_dim"), ("patch_size", "img_size")))
        finite_number("U-ViT.mlp_ratio", self.mlp_ratio, low=0.0, low_open=True)

    @property
    def in_channels(self) -> int:
        return self.in_chans

    @property
    def out_channels(self) -> int:
        return self.in_chans

    @property
    def input_size(self) -> int:
        return self.img_size

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_class(self) -> Optional[int]:
        """The label of the unconditional branch (the table's last row), None when unconditional."""
        return self.num_classes - 1 if self.conditional else None

    @property
    def num_labels(self) -> int:
        """The class labels a sample may carry: the table's rows less the null class (0 if unconditional)."""
        return self.num_classes - 1 if self.conditional else 0

    @property
    def extras(self) -> int:
        return 2 if self.conditional else 1

    @property
    def num_blocks(self) -> int:
        return 2 * (self.depth // 2) + 1

    @property
    def num_units(self) -> int:
        return 2 * self.num_blocks

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str, **kw) -> "UViTConfig":
        if name not in UVIT_VARIANTS:
            raise ConfigError(f"unknown U-ViT model {name!r}; known: {', '.join(UVIT_VARIANTS)}")
        embed, depth, heads, patch = UVIT_VARIANTS[name]
        return cls(embed_dim=embed, depth=depth, num_heads=heads, patch_size=patch, **kw)


class Block(nn.Module):
    """Pre-norm block; with `skip`, first `skip_linear(concat([x, skip]))`. Units 2*index, 2*index+1."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    skip: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip, index: int, cache=None, mask=None, beta=None):
        if self.skip:
            x = nn.Dense(self.dim, dtype=self.dtype, name="skip_linear")(jnp.concatenate([x, skip], axis=-1))
        def attn():
            return Attention(self.dim, self.num_heads, qkv_bias=self.qkv_bias, dtype=self.dtype,
                             name="attn")(LayerNorm(1e-5, name="norm1")(x))

        def mlp():
            return Mlp(int(self.dim * self.mlp_ratio), self.dim, approximate_gelu=False, dtype=self.dtype,
                       name="mlp")(LayerNorm(1e-5, name="norm2")(x))

        attn_out = run_unit(self, 2 * index, attn, cache, mask, beta, self.dtype)
        x = x + attn_out
        mlp_out = run_unit(self, 2 * index + 1, mlp, cache, mask, beta, self.dtype)
        x = x + mlp_out
        return x, (attn_out, mlp_out)


class UViT(nn.Module):
    """`apply(params, x, t, y, cache, mask, beta) -> (out, new_cache)`; x, out NHWC with in_chans channels.

    `t` is in the model's own units (continuous time x 1000); `y` (B,) ints,
    or None for an unconditional model.
    """

    config: UViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, cache=None, mask: Optional[tuple] = None, beta=None):
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.img_size, cfg.img_size, cfg.in_chans):
            raise ConfigError(f"U-ViT expects inputs (B, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans}) "
                              f"(NHWC), got {tuple(x.shape)}")
        if cfg.conditional and y is None:
            raise ConfigError(f"this U-ViT is class-conditional ({cfg.num_classes} label rows): pass y")
        if not cfg.conditional and y is not None:
            raise ConfigError("this U-ViT is unconditional: pass y=None")
        x = x.astype(self.dtype)
        b, hh, ww, _ = x.shape
        p = cfg.patch_size
        d = cfg.embed_dim

        tokens = PatchEmbed(d, p, dtype=self.dtype, name="patch_embed")(x)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        temb = timestep_embedding(t, d).astype(self.dtype)
        if cfg.mlp_time_embed:
            temb = nn.Dense(4 * d, dtype=self.dtype, name="time_embed_0")(temb)
            temb = nn.Dense(d, dtype=self.dtype, name="time_embed_2")(nn.silu(temb))
        extra = [temb[:, None]]
        if cfg.conditional:
            label = nn.Embed(cfg.num_classes, d, dtype=self.dtype, name="label_emb")(jnp.asarray(y).reshape(b))
            extra.insert(0, label[:, None])  # sequence: [label, time, patches]
        tokens = jnp.concatenate(extra + [tokens], axis=1)
        pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                               (1, cfg.extras + cfg.num_patches, d))
        tokens = tokens + pos_embed.astype(self.dtype)

        def block(name, skip=False):
            return Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, skip=skip, dtype=self.dtype, name=name)

        new_cache = []
        skips = []
        column_block = 0
        for i in range(cfg.depth // 2):
            tokens, units = block(f"in_blocks_{i}")(tokens, None, column_block, cache, mask, beta)
            column_block += 1
            skips.append(tokens)
            new_cache.extend(units)
        tokens, units = block("mid_block")(tokens, None, column_block, cache, mask, beta)
        column_block += 1
        new_cache.extend(units)
        for i in range(cfg.depth // 2):
            tokens, units = block(f"out_blocks_{i}", cfg.skip)(tokens, skips.pop(), column_block, cache, mask, beta)
            column_block += 1
            new_cache.extend(units)

        tokens = LayerNorm(1e-5, name="norm")(tokens)
        out = nn.Dense(p * p * cfg.in_chans, dtype=self.dtype, name="decoder_pred")(tokens)
        out = out[:, cfg.extras:]
        # unpatchify: 'B (h w) (p1 p2 C) -> B (h p1) (w p2) C' (the original's order, in NHWC).
        out = out.reshape(b, hh // p, ww // p, p, p, cfg.in_chans)
        out = out.transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, cfg.in_chans)
        if cfg.conv:
            out = nn.Conv(cfg.in_chans, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="final_layer")(out)
        return out.astype(jnp.float32), tuple(new_cache)
