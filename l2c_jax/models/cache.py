"""The layer-cache contract shared by every model.

A model with D blocks has 2*D cacheable units: column 2i is the attention
branch of block i, 2i+1 its MLP branch. A unit's cached value is its output
*as used* in the residual stream at the last call (before DiT's adaLN gate).

- `mask` is a static tuple of 2*D bools (True = compute). A False unit is
  never traced, so under `jax.jit` it is absent from the compiled graph.
- `beta` (2*D,) interpolates every computed unit with its cached value:
  `beta*computed + (1-beta)*cached`; differentiable, used to train routers.
- The returned cache is a tuple of 2*D arrays (B, tokens, width).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from l2c_jax.errors import ConfigError


def check_mask(mask, num_units: int):
    """Normalises a mask to a tuple of Python bools, or None."""
    if mask is None:
        return None
    try:
        mask = tuple(bool(m) for m in mask)
    except TypeError:
        raise ConfigError(f"mask must be a sequence of {num_units} bools, got {type(mask).__name__}") from None
    if len(mask) != num_units:
        raise ConfigError(f"mask has {len(mask)} entries, the model has {num_units} cacheable sub-layers")
    return None if all(mask) else mask


def run_unit(index: int, compute: Callable, cache: Optional[Sequence], mask, beta):
    """Computes, reuses or interpolates unit `index` according to the contract."""
    if mask is not None and not mask[index]:
        if cache is None:
            raise ConfigError(f"mask reuses sub-layer {index} but no cache was given")
        return cache[index]
    out = compute()
    if beta is not None:
        if cache is None:
            raise ConfigError("beta interpolates with the cache, but no cache was given")
        b = beta[index].astype(out.dtype)
        out = b * out + (1 - b) * cache[index].astype(out.dtype)
    return out
