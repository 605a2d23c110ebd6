"""Retargeting a router to another step count: `retarget(router, steps)`.

A router holds one row per sampler step of the step count it was trained
for. Its rows vary smoothly with the diffusion time of their step (what the
model is told: the timestep for DiT + DDIM, round(1000 t) of the solver
step's start for U-ViT + DPM-Solver-2), so a router for N steps gives one for
M steps by interpolating each sub-layer's logit (`prob`, before the sigmoid)
linearly over that time axis, holding the end values past the ends. Cache
steps interpolate only from cache steps of the same position in the period
(a period-3 router's "one step after a full step" rows from its own kind),
so the period and the forecast carry over unchanged, and so does the
threshold; learned forecast coefficients interpolate the same way. Full
steps' rows are never read and are written as 0.

It costs nothing and needs no data; how close it comes to a router trained
for M steps is measured in the README (the digits DiT, 50 -> 20 and 20 -> 50).
"""

from __future__ import annotations

import numpy as np

from l2c_jax.diffusion import DiscreteVPSchedule, DPMSolver, create_diffusion
from l2c_jax.errors import ConfigError
from l2c_jax.router import Router

__all__ = ["retarget", "row_times"]


def row_times(kind: str, rows: int, skip_type: str = "time_uniform") -> np.ndarray:
    """(rows,) the diffusion time (0..1000) of every router row; NaN for rows no sampler step uses."""
    if kind == "dit-ddim":
        return np.asarray(create_diffusion(str(rows)).timestep_map, np.float64)
    nfe = int(rows)
    if nfe < 4 or nfe % 2:
        raise ConfigError(f"a uvit-dpm2 router has NFE rows, an even number >= 4; got {nfe}")
    schedule = DiscreteVPSchedule.stable_diffusion()
    plan = DPMSolver(schedule, predict_x0=True, solver_type="dpm_solver").plan(nfe, 2, "singlestep", skip_type)
    out = np.full((nfe,), np.nan)
    out[:len(plan)] = schedule.discrete_timesteps([st.s for st in plan])  # the U-ViT router loss's timesteps
    return out


def _position(router: Router, s: int) -> int:
    return s % router.period if router.kind == "dit-ddim" else 1


def retarget(router: Router, steps: int, skip_type: str = "time_uniform") -> Router:
    """`router` for `steps` rows (DDIM steps, or U-ViT NFE) by interpolation over diffusion time."""
    steps = int(steps)
    if steps == router.steps:
        return router
    if steps < 2:
        raise ConfigError(f"cannot retarget a router to {steps} steps")
    if router.anchors is not None:
        raise ConfigError(f"{router.source or 'the router'} places its full steps for {router.steps} steps "
                          f"(anchors {','.join(map(str, router.anchors))}); placed anchors do not retarget: "
                          f"train a router for {steps} steps")
    src = f"{router.source or 'router'} retargeted from {router.steps} to {steps} steps"
    target = Router(np.zeros((steps, router.num_units), np.float32), router.kind, threshold=router.threshold,
                    source=src, period=router.period, forecast=router.forecast)
    if router.kind == "dit-ddim" and router.period == 2 and steps % 2:
        raise ConfigError(f"cannot retarget to {steps} DDIM steps: L2C's period-2 routers need an even step count")
    t_src, t_dst = row_times(router.kind, router.steps, skip_type), row_times(router.kind, steps, skip_type)
    prob = np.zeros((steps, router.num_units), np.float32)
    coefs = None if router.coefs is None else np.zeros((steps, router.num_units, 2), np.float32)
    for pos in sorted({_position(target, s) for s in target.cache_steps()}):
        src_rows = [router._row_of_step(s) for s in router.cache_steps() if _position(router, s) == pos]
        dst_rows = [target._row_of_step(s) for s in target.cache_steps() if _position(target, s) == pos]
        if not src_rows:
            raise ConfigError(f"{router.source or 'the router'} has no cache steps to retarget from")
        order = np.argsort(t_src[src_rows])
        xs, ys = t_src[src_rows][order], router.prob[src_rows][order]
        cs = None if coefs is None else router.coefs[src_rows][order]
        for u in range(router.num_units):
            prob[dst_rows, u] = np.interp(t_dst[dst_rows], xs, ys[:, u])
            for k in range(0 if cs is None else 2):
                coefs[dst_rows, u, k] = np.interp(t_dst[dst_rows], xs, cs[:, u, k])
    target.prob = prob
    target.coefs = coefs
    return target
