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
