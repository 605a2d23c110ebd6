"""The model families by name: config dataclass, Flax module, and example input shapes.

A plain table, imported like any module: nothing registers itself, so a
family is known as soon as `l2c_jax.model` is imported.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from l2c_jax.errors import CheckpointError
from l2c_jax.models.dit import DiT, DiTConfig
from l2c_jax.models.uvit import UViT, UViTConfig


class Family(NamedTuple):
    config_cls: type
    module_cls: type
    example_inputs: Callable  # config -> (x, t, y) ShapeDtypeStructs (y None when unconditional)


def _dit_inputs(cfg: DiTConfig):
    s = cfg.input_size
    return (jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))


def _uvit_inputs(cfg: UViTConfig):
    s = cfg.img_size
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.num_classes > 0 else None
    return (jax.ShapeDtypeStruct((1, s, s, cfg.in_chans), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32), y)


FAMILIES = {
    "dit": Family(DiTConfig, DiT, _dit_inputs),
    "uvit": Family(UViTConfig, UViT, _uvit_inputs),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]
