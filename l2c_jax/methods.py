"""Caching methods, each one thing: given a model, a sampler and its knob, a schedule.

A schedule (`l2c_jax.schedule.Schedule`) has one row per model evaluation in
sampling order and 2 x blocks columns (True = compute the unit), plus how a
reused unit's value is formed (`forecast`: "copy", or TaylorSeer's "taylor1" /
"taylor2", `l2c_jax.sampling.forecast`). Its computed share is computed unit
evaluations / (model evaluations of the full reference sampler x 2 x blocks),
counted per guidance branch: DDIM with k steps against full DDIM with N counts k/N.

Methods (`METHODS`, by name; DiT column 2i is block i's attention, 2i+1 its MLP):

- `full`: every unit at every step (the reference).
- `l2c`: a learned router, thresholded (knob: "-" for the step count's router at its
  threshold, a threshold, or NAME[@threshold] for another router of that step
  count, e.g. "k3" for one trained with cache period 3; a router trained with
  forecasts samples with them).
- `fora`: every unit recomputed every N-th step, reused otherwise (knob: N).
- `delta_dit`: Delta-DiT's split: at every N-th step all units compute; in
  between, the back b blocks are reused during the first half of sampling
  and the front b blocks during the second (knob: b; N = 2).
- `deepcache`: the first and last blocks compute at every step; the middle
  ones every N-th step (knob: N).
- `smoothcache`: each unit's relative L1 change between consecutive steps,
  calibrated on a few full trajectories; a unit is reused while its
  accumulated change since its last compute stays below alpha (knob: alpha).
- `error_ranked`: the same calibrated changes, ranked; the (step, unit) pairs
  that change least are reused until L2C's budget is met, no training.
- `random`: random (step, unit) pairs reused, at L2C's budget (knob: seed).
- `fewer_steps`: the sampler with k steps (knob: k).
- `taylorseer`: FORA's schedule with every reused unit forecast to the
  current step by a Taylor expansion of order 1 or 2 (knob: "N/order"), or
  L2C's schedule forecast instead of copied (knob: "l2c/order"), or full
  steps placed by a layout rather than every N-th (knob: "warpC^P@L/order",
  `l2c_jax.schedule.anchor_layout`), or by a search on calibration noise
  (knob: "searchC/order": C full steps, placed where the final samples come
  closest to the full sampler's; `search_layout`).

The first row always computes everything (there is no cache yet).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, Optional

import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.schedule import Schedule, anchor_layout

__all__ = ["METHODS", "Context", "Schedule", "make_schedule", "schedule_error", "search_layout", "unit_changes"]


@dataclasses.dataclass
class Context:
    """What methods read: the model's shape, the step count, L2C's schedule and the calibrated changes."""

    num_units: int
    steps: int
    # (router name, "" for the step count's own; threshold, None for the default) -> its Schedule
    # (`l2c_jax.schedule.from_router`: masks, forecast, anchors)
    router_schedule: Callable[[str, Optional[float]], Schedule]
    changes: Callable[[], np.ndarray]  # () -> (steps, units) relative change of each unit at each step
    # schedule -> its final samples' mean squared difference from the full sampler's on calibration noise
    error: Optional[Callable[[Schedule], float]] = None

    def l2c_masks(self, threshold: Optional[float] = None) -> np.ndarray:
        return np.asarray(self.router_schedule("", threshold).masks, bool)

    @property
    def depth(self) -> int:
        return self.num_units // 2

    def l2c_budget(self) -> int:
        """Unit evaluations L2C's schedule reuses at its own threshold."""
        return int((~np.asarray(self.l2c_masks(None), bool)).sum())


def _schedule(ctx, method, setting, masks=None, forecast="copy", steps=None, anchors=None,
              coefficients=None) -> Schedule:
    steps = ctx.steps if steps is None else int(steps)
    if masks is not None:
        masks = np.asarray(masks, bool).copy()
        masks[0] = True  # the first step fills the cache
    return Schedule(masks=masks, forecast=forecast, anchors=anchors, method=method, setting=str(setting),
                    steps=steps, reference_steps=ctx.steps, num_units=ctx.num_units, coefficients=coefficients)


def _blocks(ctx, blocks) -> np.ndarray:
    """A (units,) mask selecting both units of each block in `blocks`."""
    sel = np.zeros((ctx.num_units,), bool)
    for b in blocks:
        sel[2 * b:2 * b + 2] = True
    return sel


def full(ctx, setting=None) -> Schedule:
    return _schedule(ctx, "full", setting or "-")


def l2c(ctx, setting=None) -> Schedule:
    setting = "-" if setting in (None, "") else str(setting)
    name, _, thr = setting.partition("@")
    try:
        float(name)  # a bare threshold
        name, thr = "", name
    except ValueError:
        name = "" if name == "-" else name
    routed = ctx.router_schedule(name, float(thr) if thr else None)
    # Everything the router says: its masks, forecast, anchors and learned forecast coefficients.
    return _schedule(ctx, "l2c", setting, routed.masks, forecast=routed.forecast, anchors=routed.anchors,
                     coefficients=routed.coefficients)


def _every(ctx, n: int) -> np.ndarray:
    if n < 1:
        raise ConfigError(f"the interval must be at least 1, got {n}")
    return np.arange(ctx.steps) % n == 0


def fora(ctx, n) -> Schedule:
    n = int(n)
    return _schedule(ctx, "fora", n, np.repeat(_every(ctx, n)[:, None], ctx.num_units, 1))


def delta_dit(ctx, b, n: int = 2) -> Schedule:
    b = int(b)
    if not 0 < b < ctx.depth:
        raise ConfigError(f"delta_dit caches 1..{ctx.depth - 1} blocks, got {b}")
    masks = np.ones((ctx.steps, ctx.num_units), bool)
    back, front = _blocks(ctx, range(ctx.depth - b, ctx.depth)), _blocks(ctx, range(b))
    for s in np.flatnonzero(~_every(ctx, n)):
        masks[s] = ~(back if s < ctx.steps // 2 else front)  # outline early (back blocks), details late (front)
    return _schedule(ctx, "delta_dit", b, masks)


def deepcache(ctx, n) -> Schedule:
    n = int(n)
    middle = _blocks(ctx, range(1, ctx.depth - 1))
    masks = np.ones((ctx.steps, ctx.num_units), bool)
    masks[~_every(ctx, n)] = ~middle
    return _schedule(ctx, "deepcache", n, masks)


def smoothcache(ctx, alpha) -> Schedule:
    alpha = float(alpha)
    change = ctx.changes()
    masks = np.ones((ctx.steps, ctx.num_units), bool)
    acc = np.zeros((ctx.num_units,))
    for s in range(1, ctx.steps):
        acc += change[s]
        reuse = acc <= alpha
        masks[s] = ~reuse
        acc[~reuse] = 0.0  # computed: the cache is fresh again
    return _schedule(ctx, "smoothcache", f"{alpha:g}", masks)


def _reuse_count(ctx, budget) -> int:
    if budget in (None, "", "l2c"):
        return ctx.l2c_budget()
    share = float(budget)  # a computed share in (0, 1]
    return int(round((1.0 - share) * ctx.steps * ctx.num_units))


def error_ranked(ctx, budget="l2c") -> Schedule:
    change = np.array(ctx.changes(), np.float64)
    change[0] = np.inf  # never reuse at the first step
    k = _reuse_count(ctx, budget)
    order = np.argsort(change, axis=None, kind="stable")[:k]
    masks = np.ones(change.shape, bool)
    masks.flat[order] = False
    return _schedule(ctx, "error_ranked", budget or "l2c", masks)


def random(ctx, seed=0) -> Schedule:
    k = _reuse_count(ctx, None)
    candidates = np.arange(ctx.num_units, ctx.steps * ctx.num_units)  # every (step >= 1, unit) pair
    pick = np.random.default_rng(int(seed)).choice(candidates, size=k, replace=False)
    masks = np.ones((ctx.steps, ctx.num_units), bool)
    masks.flat[pick] = False
    return _schedule(ctx, "random", int(seed), masks)


def fewer_steps(ctx, k) -> Schedule:
    k = int(k)
    if not 1 <= k <= ctx.steps:
        raise ConfigError(f"fewer_steps runs 1..{ctx.steps} steps, got {k}")
    return _schedule(ctx, "fewer_steps", k, steps=k)


def taylorseer(ctx, setting="2/2") -> Schedule:
    base, _, order = str(setting).partition("/")
    order = int(order or 2)
    if order not in (1, 2):
        raise ConfigError(f"taylorseer forecasts with order 1 or 2, got {order}")
    # On L2C's schedule the router's period starts are the anchors; FORA's computed steps are its own; a
    # placed layout (warpC^P[@L], `l2c_jax.schedule.anchor_layout`) computes everything at its anchors only.
    if base == "l2c":
        base_schedule = ctx.router_schedule("", None)
    elif base.isdigit():
        base_schedule = fora(ctx, int(base))
    else:
        m = re.fullmatch(r"search(\d+)", base)
        placed = search_layout(ctx, int(m[1]), order) if m else anchor_layout(base, ctx.steps)
        base_schedule = _placed(ctx, placed)
    return _schedule(ctx, "taylorseer", f"{base}/{order}", base_schedule.masks, forecast=f"taylor{order}",
                     anchors=base_schedule.anchors)


def _placed(ctx, anchors: np.ndarray) -> Schedule:
    """Every unit computes at the anchors and only there."""
    return _schedule(ctx, "placed", "-", np.repeat(anchors[:, None], ctx.num_units, 1), anchors=anchors)


def search_layout(ctx, count: int, order: int = 2, powers=(0.5, 0.6, 0.8), max_rounds: int = 4) -> np.ndarray:
    """(steps,) bool: `count` anchors (full steps) for a Taylor forecast of `order`, placed where the final
    samples on calibration noise come closest to the full sampler's (`ctx.error`).

    A coordinate search, deterministic: it starts from the best `warpC^P@L` layout over a small grid (P in
    `powers`, the last anchor 1 or 3 steps before the last step), then moves one anchor at a time by 1 or 2 steps
    while that lowers the error, for at most `max_rounds` passes. It costs one calibration sampling run per
    layout tried: about 6 + 4 (count - 1) per pass.
    """
    steps = ctx.steps
    if ctx.error is None:
        raise ConfigError("searching an anchor layout needs calibration samples (this caller gives none)")
    if not 2 <= count <= steps:
        raise ConfigError(f"search{count}: the anchor count must lie in [2, {steps}] at {steps} steps")
    if count == steps:
        return np.ones(steps, bool)
    tried = {}

    def error(where) -> float:
        where = tuple(int(w) for w in where)
        if where not in tried:
            anchors = np.zeros(steps, bool)
            anchors[list(where)] = True
            placed = _placed(ctx, anchors)
            tried[where] = ctx.error(_schedule(ctx, "taylorseer", "search", placed.masks, forecast=f"taylor{order}",
                                               anchors=anchors))
        return tried[where]

    starts = []
    for power in powers:
        for last in (steps - 2, steps - 4):
            where = np.round(max(last, count - 1) * np.linspace(0.0, 1.0, count) ** power).astype(int)
            if len(np.unique(where)) == count:
                starts.append(tuple(where))
    if not starts:  # too many anchors to warp: even spacing
        starts.append(tuple(np.round(np.linspace(0, steps - 1, count)).astype(int)))
    best = min(starts, key=error)
    for _ in range(max_rounds):
        moved = False
        for i in range(1, count):
            for delta in (-2, -1, 1, 2):
                cand = list(best)
                cand[i] += delta
                low, high = cand[i - 1], cand[i + 1] if i + 1 < count else steps
                if low < cand[i] < high and error(cand) < error(best):
                    best, moved = tuple(cand), True
        if not moved:
            break
    out = np.zeros(steps, bool)
    out[list(best)] = True
    return out


METHODS: Dict[str, Callable] = dict(full=full, l2c=l2c, fora=fora, delta_dit=delta_dit, deepcache=deepcache,
                                    smoothcache=smoothcache, error_ranked=error_ranked, random=random,
                                    fewer_steps=fewer_steps, taylorseer=taylorseer)


def make_schedule(ctx: Context, method: str, setting=None) -> Schedule:
    if method not in METHODS:
        raise ConfigError(f"unknown caching method {method!r} (known: {', '.join(METHODS)})")
    return METHODS[method](ctx, setting) if setting is not None else METHODS[method](ctx)


def schedule_error(sampler, noise, y, cfg_scale="default") -> Callable[[Schedule], float]:
    """schedule -> the mean squared difference of its final samples from the full sampler's on `noise` (the
    full run happens once, on first use)."""
    reference = []

    def error(schedule: Schedule) -> float:
        if not reference:
            reference.append(np.asarray(sampler(noise, y, None, cfg_scale=cfg_scale), np.float32))
        out = np.asarray(sampler(noise, y, schedule, cfg_scale=cfg_scale), np.float32)
        return float(np.mean((out - reference[0]) ** 2))

    return error


def unit_changes(sampler, noise, y, cfg_scale="default") -> np.ndarray:
    """(steps, units): each unit's relative L1 change from one step to the next on a full trajectory.

    Row 0 is zero; row s is mean over samples of |f_s - f_{s-1}|_1 / |f_{s-1}|_1.
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def change(prev, cur):
        def one(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            axes = tuple(range(1, a.ndim))
            return jnp.mean(jnp.sum(jnp.abs(b - a), axes) / (jnp.sum(jnp.abs(a), axes) + 1e-12))
        return jnp.stack([one(a, b) for a, b in zip(prev, cur)])

    rows = [np.zeros((sampler.model.num_units,))]
    state = {}

    def on_step(s, units):
        if "prev" in state:
            rows.append(np.asarray(change(state["prev"], units)))
        state["prev"] = tuple(jnp.array(u, copy=True) for u in units)  # the next step takes `units` over

    sampler(noise, y, None, cfg_scale=cfg_scale, on_step=on_step)
    return np.stack(rows)
