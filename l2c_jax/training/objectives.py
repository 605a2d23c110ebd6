"""Each family's router-training objective behind one interface, looked up by family name.

A `RouterObjective` is everything the router trainer needs to know about a
family: the router kind and its number of rows, the rows the heat map shows,
the random draws of one step and the loss of a router on them. The trainer
and the loop hold no family branches; a new family adds one builder to
`OBJECTIVES` (a plain dict, nothing registers itself on import).

- "dit": DDIM (`dit_router_loss`), a "dit-ddim" router with one row per DDIM
  step; the heat map shows the cache steps' rows in sampling order.
- "uvit": singlestep DPM-Solver-2 (`uvit_router_loss`), a "uvit-dpm2"
  router with NFE rows (the released dpm20 / dpm50 layout) of which rows
  1..NFE//2-1 train.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import numpy as np

from l2c_jax.diffusion import create_diffusion
from l2c_jax.errors import ConfigError
from l2c_jax.router import Router
from l2c_jax.schedule import anchor_layout
from l2c_jax.sampling.forecast import check_forecast, shift_coefficients
from l2c_jax.training.losses import (UViTLossSchedule, dit_random_batch, dit_router_loss, uvit_random_batch,
                                     uvit_router_loss)


@dataclasses.dataclass(frozen=True, eq=False)
class RouterObjective:
    """One family's router objective (hashes by identity, like the tables it holds).

    loss(prob, params, batch) -> (loss, aux with "data_loss" and "l1"): `prob` is
    the only differentiated argument. draw(key, x0, y) -> batch: the step's random
    draws (timestep / solver step, noise, label dropout) around the latents x0.
    """

    kind: str                # the router kind written to router.safetensors
    rows: int                # router rows (DDIM steps, or DPM-Solver-2 NFE)
    heat_rows: np.ndarray    # the rows the heat map shows, in sampling order
    tables: Any              # the diffusion / solver tables the loss closes over
    loss: Callable
    draw: Callable
    period: int = 2          # a full step, then period-1 cache steps (dit-ddim)
    forecast: str = "copy"   # how a reused unit's value is formed in training and sampling
    # Learned forecasts: the coefficients they start from, (rows, units, 2), Taylor's own (None: not learned).
    initial_coefs: Optional[np.ndarray] = None
    anchors: Optional[tuple] = None  # placed full steps (sampler steps), when not every period-th

    def router(self, prob, threshold=None, source=None, coefs=None) -> Router:
        """A `Router` of this objective's kind, period, anchors and forecast (and learned coefficients)."""
        return Router(np.asarray(prob), self.kind, threshold=threshold, source=source, period=self.period,
                      forecast=self.forecast, coefs=None if coefs is None else np.asarray(coefs),
                      anchors=self.anchors)


def _common(config) -> tuple[float, Optional[float], float]:
    tc = config.train
    return float(tc.l1), tc.get("ste_threshold"), float(tc.get("label_dropout", 0.1))


def dit_objective(model, config) -> RouterObjective:
    """DDIM on the DiT's diffusion respaced to `sampler.steps`, in cache periods of `router.period` steps
    (2: full and cache steps alternate, the original; even step counts only, as the original), or with the
    full steps `router.anchors` places (a layout spec, `l2c_jax.schedule.anchor_layout`)."""
    steps = int(config.sampler.steps)
    rc = config.get("router") or {}
    period, forecast = int(rc.get("period", 2) or 2), check_forecast(rc.get("forecast") or "copy")
    anchors = None
    if rc.get("anchors"):
        anchors = anchor_layout(rc.anchors, steps)
        if anchors.all():
            raise ConfigError(f"router.anchors {rc.anchors!r} leaves no cache step among {steps} steps")
        period = 2  # unused with placed anchors; recorded as the default
    elif period < 2 or period > steps:
        raise ConfigError(f"router.period must lie in [2, {steps}] (a full step and at least one cache step), "
                          f"got {period}")
    if anchors is None and period == 2 and steps % 2:
        raise ConfigError(f"sampler.steps must be even for DiT caching (full and cache steps alternate), "
                          f"got {steps}")
    l1, ste, dropout = _common(config)
    if dropout > 0 and not model.config.has_null_class:
        raise ConfigError(f"train.label_dropout={dropout} drops labels to the null class, and this DiT has no "
                          "null-class row (trained with class dropout 0): set train.label_dropout=0")
    learn = bool(rc.get("learn_forecast", False))
    if learn and forecast == "copy":
        raise ConfigError("router.learn_forecast learns how reused units are forecast: set router.forecast to "
                          "taylor1 or taylor2")
    diffusion = create_diffusion(str(steps), learn_sigma=model.config.learn_sigma)
    loss = functools.partial(dit_router_loss, model=model, diffusion=diffusion, l1_weight=l1, ste_threshold=ste,
                             period=period, forecast=forecast, anchors=anchors)
    draw = functools.partial(dit_random_batch, steps=diffusion.num_timesteps, null_class=model.config.null_class,
                             label_dropout=dropout, period=period, anchors=anchors)
    full = anchors if anchors is not None else np.arange(steps) % period == 0
    heat_rows = np.asarray([steps - 1 - s for s in np.flatnonzero(~full)])
    coefs = taylor_coefs(steps, model.num_units, period, anchors) if learn else None
    placed = None if anchors is None else tuple(int(s) for s in np.flatnonzero(anchors))
    return RouterObjective("dit-ddim", steps, heat_rows, diffusion, loss, draw, period, forecast, coefs, placed)


def taylor_coefs(steps: int, num_units: int, period: int = 2, anchors=None) -> np.ndarray:
    """(steps, units, 2) the coefficients of d1 and d2 Taylor's forecast advances a reused unit by, per router
    row (a respaced index: row steps-1-s is sampler step s, j steps after the last anchor: s % period, or
    counted from the placed `anchors`)."""
    full = np.asarray(anchors, bool) if anchors is not None else np.arange(steps) % period == 0
    last = np.maximum.accumulate(np.where(full, np.arange(steps), 0))
    out = np.zeros((steps, num_units, 2), np.float32)
    for s in range(steps):
        j = s - last[s]
        if j:
            out[steps - 1 - s] = shift_coefficients(j - 1, j)
    return out


def uvit_objective(model, config) -> RouterObjective:
    """Singlestep DPM-Solver-2 with `sampler.steps` = NFE, as the original U-ViT router script runs."""
    name = config.sampler.get("name", "dpm_solver2")
    if name != "dpm_solver2":
        raise ConfigError(f"U-ViT router training runs singlestep DPM-Solver-2 as the original does; "
                          f"sampler.name must be 'dpm_solver2', got {name!r}")
    steps = int(config.sampler.steps)
    l1, ste, dropout = _common(config)
    tables = UViTLossSchedule.create(steps, skip_type=config.sampler.get("skip_type", "time_uniform"))
    heat_rows = np.asarray(Router(np.zeros((steps, model.num_units), np.float32), "uvit-dpm2").cache_rows())
    loss = functools.partial(uvit_router_loss, model=model, tables=tables, l1_weight=l1, ste_threshold=ste)
    conditional = model.config.conditional

    def draw(key, x0, y):
        return uvit_random_batch(key, x0, y if conditional else None, steps=tables.num_steps,
                                 null_class=model.config.null_class, label_dropout=dropout)

    return RouterObjective("uvit-dpm2", steps, heat_rows, tables, loss, draw)


# family name -> builder(model, config) -> RouterObjective
OBJECTIVES: dict[str, Callable[[Any, Any], RouterObjective]] = {
    "dit": dit_objective,
    "uvit": uvit_objective,
}


def router_objective(model, config) -> RouterObjective:
    """The objective of `model`'s family, validated against the config's sampler."""
    try:
        build = OBJECTIVES[model.family]
    except KeyError:
        raise ConfigError(f"router training for the {model.family} family is not wired in yet "
                          f"(known: {', '.join(sorted(OBJECTIVES))})") from None
    return build(model, config)
