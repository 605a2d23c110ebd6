"""How a reused unit's value is formed: copied (L2C, FORA, ...) or forecast from its history (TaylorSeer).

"copy" hands the model the unit's last computed output, as every cache
method does. "taylor1" / "taylor2" (TaylorSeer, Liu et al. 2025) keep, per
unit, its last computed output and finite-difference estimates of its first
and second derivatives over sampler steps, and hand the model the Taylor
extrapolation to the current step instead:

    f(s) ~ v + d1 * j + d2 * j^2 / 2,   j = s - (the step v was computed at)

where, at each compute, d1 = (v_new - v_old) / dt and d2 = (d1_new - d1_old) / dt
(dt: steps since that unit's previous compute). A term is used once it has
been estimated (d1 after two computes of the unit, d2 after three), so any
static schedule (FORA's, L2C's) can forecast. The history is an explicit
pytree updated by one jitted function per step.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError

FORECASTS = ("copy", "taylor1", "taylor2")


def check_forecast(forecast: Optional[str]) -> str:
    forecast = forecast or "copy"
    if forecast not in FORECASTS:
        raise ConfigError(f"unknown forecast {forecast!r} (known: {', '.join(FORECASTS)})")
    return forecast


def forecast_order(forecast: Optional[str]) -> int:
    """The Taylor order of a forecast: 0 (copy), 1 or 2."""
    return FORECASTS.index(check_forecast(forecast))


@functools.partial(jax.jit, static_argnums=(3,))
def _predict(terms, offsets, known, units):
    # terms: per unit (v, d1, d2); offsets (U,) steps since v; known (U, 2): d1 / d2 estimated.
    # Only `units` (the ones this step reuses) are forecast; the others pass their value through.
    def one(t, j, k):
        v, d1, d2 = t
        out = v.astype(jnp.float32) + (k[0] * j) * d1 + (k[1] * j * j / 2) * d2
        return out.astype(v.dtype)
    return tuple(one(t, offsets[u], known[u]) if u in units else t[0] for u, t in enumerate(terms))


@functools.partial(jax.jit, static_argnums=(4,))
def _update(terms, values, dt, known, units):
    # For the computed `units`: v <- value, d1 <- (value - v) / dt, d2 <- (d1_new - d1) / dt (unknown terms: 0).
    def one(t, value, h, k):
        v, d1, d2 = t
        new_d1 = jnp.where(k[0], (value.astype(jnp.float32) - v.astype(jnp.float32)) / h, 0.0)
        new_d2 = jnp.where(k[1], (new_d1 - d1) / h, 0.0)
        return (value, new_d1, new_d2)
    return tuple(one(t, values[u], dt[u], known[u]) if u in units else t for u, t in enumerate(terms))


class Forecaster:
    """The per-unit history of one sampling run and the values it hands the model at each step."""

    def __init__(self, forecast: str, num_units: int):
        self.order = forecast_order(forecast)
        self.num_units = num_units
        self.terms = None
        self.last = np.full((num_units,), -1, np.int64)  # the step each unit was last computed at
        self.computes = np.zeros((num_units,), np.int64)  # how often each unit was computed so far

    def _known(self, computes) -> jnp.ndarray:
        # d1 once a unit has two computes, d2 once it has three, within the chosen order.
        return jnp.asarray(np.stack([(computes >= 2) & (self.order >= 1), (computes >= 3) & (self.order >= 2)], 1))

    def inputs(self, step: int, mask, cache):
        """The cache to hand the model at `step` whose mask is `mask` (None: all computed): `cache` itself
        for "copy" or where nothing is reused, else the forecasts of the reused units."""
        if self.order == 0 or self.terms is None or mask is None:
            return cache
        reused = tuple(int(u) for u in np.flatnonzero(~np.asarray(mask, bool)))
        offsets = jnp.asarray(np.maximum(step - self.last, 0), jnp.float32)
        return _predict(self.terms, offsets, self._known(self.computes), reused)

    def update(self, step: int, mask, new_cache) -> None:
        """Records the units `mask` computed at `step` (None: all) from the model's returned cache."""
        if self.order == 0 or new_cache is None:
            return
        computed = np.ones((self.num_units,), bool) if mask is None else np.asarray(mask, bool)
        if not computed.any():
            return
        if self.terms is None:
            zeros = tuple(jnp.zeros(c.shape, jnp.float32) for c in new_cache)
            self.terms = tuple((c, z, z) for c, z in zip(new_cache, zeros))
        after = self.computes + computed
        dt = jnp.asarray(np.maximum(step - self.last, 1), jnp.float32)
        units = tuple(int(u) for u in np.flatnonzero(computed))
        self.terms = _update(self.terms, tuple(new_cache), dt, self._known(after), units)
        self.last = np.where(computed, step, self.last)
        self.computes = after
