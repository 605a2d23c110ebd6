"""Registers every model family with `l2c_jax.model` (importing it is enough)."""

import jax
import jax.numpy as jnp

from l2c_jax.model import register_family
from l2c_jax.models.dit import DiT, DiTConfig


def _dit_inputs(cfg: DiTConfig):
    s = cfg.input_size
    return (jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


register_family("dit", DiTConfig, DiT, _dit_inputs)


# ---- U-ViT
from l2c_jax.models.uvit import UViT, UViTConfig  # noqa: E402


def _uvit_inputs(cfg: UViTConfig):
    s = cfg.img_size
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.num_classes > 0 else None
    return (jax.ShapeDtypeStruct((1, s, s, cfg.in_chans), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32), y)


register_family("uvit", UViTConfig, UViT, _uvit_inputs)
