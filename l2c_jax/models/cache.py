"""The layer-cache contract shared by every model, and the one unit runner every block calls.

A model with D blocks has 2*D cacheable units: column 2i is the attention
branch of block i, 2i+1 its MLP branch. A unit's cached value is its output
*as used* in the residual stream at the last call (before DiT's adaLN gate).

- `mask` chooses, per unit, compute (True) or reuse the cached value (False):
  - a static tuple of 2*D Python bools: a False unit is never traced, so under
    `jax.jit` it is absent from the compiled graph (one graph per mask);
  - a (2*D,) boolean jax array (traced under jit): each unit sits behind a
    conditional, so ONE graph serves every schedule (the "cond" strategy).
- `beta` (2*D,) interpolates every computed unit with its cached value:
  `beta*computed + (1-beta)*cached`; differentiable, used to train routers.
- A cache entry is the unit's last value, or a `Forecast` (that value `base`
  advanced by `sum_k coeffs[k] * terms[k]`): a reused unit then takes the
  forecast (`l2c_jax.sampling.forecast` says how terms and coefficients are
  formed).
- The returned cache is a tuple of 2*D arrays (B, tokens, width): each unit's
  value as used (computed, copied or forecast).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2c_jax.errors import ConfigError


class Forecast(NamedTuple):
    """A reused unit's value formed from its history: `base + sum_k coeffs[k] * terms[k]`, in float32.

    base: the unit's last value; terms: arrays of base's shape (any dtype, e.g.
    bfloat16 history); coeffs: scalars (traced or Python floats).
    """

    base: jax.Array
    terms: tuple = ()
    coeffs: tuple = ()

    def value(self, dtype):
        if not self.terms:
            return self.base.astype(dtype)
        v = self.base.astype(jnp.float32)
        for c, t in zip(self.coeffs, self.terms):
            v = v + c * t.astype(jnp.float32)
        return v.astype(dtype)


def _reused(entry, dtype):
    """The value a reused unit hands on (and the cache keeps), from its cache entry."""
    return entry.value(dtype) if isinstance(entry, Forecast) else entry


def is_traced_mask(mask) -> bool:
    """True for a mask given as a jax array (one graph, units behind `lax.cond`)."""
    return isinstance(mask, jax.Array)


def check_mask(mask, num_units: int):
    """Normalises a mask: None (all compute), a tuple of Python bools, or a (num_units,) bool jax array."""
    if mask is None:
        return None
    if is_traced_mask(mask):
        if mask.shape != (num_units,):
            raise ConfigError(f"mask has shape {tuple(mask.shape)}, the model has {num_units} cacheable sub-layers")
        return mask.astype(bool)
    try:
        mask = tuple(bool(m) for m in mask)
    except (TypeError, ValueError):
        raise ConfigError(f"mask must be a sequence of {num_units} bools, got {type(mask).__name__}") from None
    if len(mask) != num_units:
        raise ConfigError(f"mask has {len(mask)} entries, the model has {num_units} cacheable sub-layers")
    return None if all(mask) else mask


def run_unit(module: nn.Module, index: int, compute: Callable, cache: Optional[Sequence], mask, beta, dtype):
    """Unit `index`'s output: computed, reused from `cache` (copied or forecast), or interpolated, as the
    contract says.

    module: the calling block (a traced mask's `nn.cond` runs its branches in
    that module's scope). compute: builds the unit's submodules by their
    PyTorch names and applies them; it is called at most once. dtype: the
    computation dtype (under a traced mask both branches return it).
    """
    traced = is_traced_mask(mask)
    entry = None if cache is None else cache[index]
    if mask is not None and not traced and not mask[index]:
        if entry is None:
            raise ConfigError(f"mask reuses sub-layer {index} but no cache was given")
        return _reused(entry, dtype)
    if (beta is not None or traced) and entry is None:
        raise ConfigError("beta or a traced mask works with the cache, but no cache was given")

    def computed(cached):
        out = compute()
        if beta is None:
            return out
        b = beta[index].astype(out.dtype)
        return b * out + (1 - b) * cached.astype(out.dtype)

    if not traced:
        return computed(None if entry is None else _reused(entry, dtype))
    # One graph for every schedule: the unit runs only where the traced mask says so.
    if isinstance(entry, Forecast):
        return nn.cond(mask[index], lambda mdl, e: computed(e.value(dtype)).astype(dtype),
                       lambda mdl, e: e.value(dtype), module, entry)
    cached = entry.astype(dtype)
    return nn.cond(mask[index], lambda mdl, c: computed(c).astype(dtype), lambda mdl, c: c, module, cached)
