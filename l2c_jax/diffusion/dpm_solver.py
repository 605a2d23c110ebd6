"""DPM-Solver (Lu et al.) for VP diffusion ODEs: singlestep orders 1-3 and multistep orders 1-2.

With `predict_x0=True` (data prediction) the singlestep solver is
DPM-Solver++ singlestep and the multistep one DPM-Solver++(2M); the U-ViT
sampler of Learning-to-Cache uses singlestep order 2 with data prediction
(the original's `dpm_solver_pp.DPM_Solver(predict_x0=True)`, `solver_type
'dpm_solver'`).

The solver is organised for caching samplers: the loop over steps stays in
Python and every update is a pure, traceable function of
`model_fn(x, t, slot) -> noise prediction`, where `t` is a float32 scalar
(continuous time) and `slot` is the Python index of the evaluation within
the step (0 = at the step's start time, 1 and 2 = the intermediate points).
The updates work both traced and eagerly: `sample` jits whole steps for a
plain model, while the caching U-ViT sampler runs them eagerly and lets
`model_fn` dispatch each evaluation to a jitted function with the right
static cache mask (slot 0 of a step may reuse the cache, the others are full).
Converting continuous time to the network's time input is the caller's job
(`DiscreteVPSchedule.model_time`).

All arithmetic is float32 in the original's operation order, so sampling
chains follow the PyTorch original to rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
SOLVER_TYPES = ("dpm_solver", "taylor")
METHODS = ("singlestep", "multistep")

# time_quadratic snaps its points to the original's grid of 10**7 uniform times.
_QUADRATIC_GRID = 10_000_000


@dataclasses.dataclass(frozen=True)
class Step:
    """One solver step from time `s` to time `t` (s > t) of the given order (model evaluations)."""

    s: float
    t: float
    order: int


def evaluations_per_step(method: str, order: int) -> int:
    """Model evaluations one step costs: `order` for singlestep, 1 for multistep."""
    return order if method == "singlestep" else 1


def _check(method: str, order: int, skip_type: str):
    if method not in METHODS:
        raise ConfigError(f"unknown DPM-Solver method {method!r} (known: {', '.join(METHODS)})")
    if skip_type not in SKIP_TYPES:
        raise ConfigError(f"unknown step spacing {skip_type!r} (known: {', '.join(SKIP_TYPES)})")
    allowed = (1, 2, 3) if method == "singlestep" else (1, 2)
    if order not in allowed:
        raise ConfigError(f"{method} DPM-Solver supports orders {allowed}, got {order}")


class DPMSolver:
    """DPM-Solver over a `DiscreteVPSchedule` (or any object with the same five time functions).

    predict_x0: True = data prediction (DPM-Solver++), False = noise
    prediction (the first DPM-Solver). solver_type: "dpm_solver" (the
    original's default) or "taylor" (the Taylor-expansion variant).
    Hashes by identity, so it can be closed over by jitted steps.
    """

    def __init__(self, schedule, predict_x0: bool = True, solver_type: str = "dpm_solver"):
        if solver_type not in SOLVER_TYPES:
            raise ConfigError(f"unknown solver_type {solver_type!r} (known: {', '.join(SOLVER_TYPES)})")
        self.schedule = schedule
        self.predict_x0 = bool(predict_x0)
        self.solver_type = solver_type
        self._step_fns = {}  # (model_fn, method, order, jit) -> step function of `sample`

    # ------------------------------------------------------------------ time grid
    def time_steps(self, skip_type: str, t_T: float, t_0: float, N: int) -> np.ndarray:
        """(N + 1,) float32 times from t_T down to t_0 (the original's `get_time_steps`).

        time_uniform: uniform in t. logSNR: uniform in lambda, mapped back
        through `inverse_lambda`. time_quadratic: uniform in sqrt(t), snapped
        (upwards) to a grid of 10**7 uniform times in [t_0, t_T], the last
        point exactly t_T.
        """
        if N < 1:
            raise ConfigError(f"a solver needs at least one step, got {N}")
        if not t_T > t_0:
            raise ConfigError(f"sampling runs from t_T down to t_0, got t_T={t_T}, t_0={t_0}")
        ns = self.schedule
        if skip_type == "time_uniform":
            return np.linspace(t_T, t_0, N + 1).astype(np.float32)
        if skip_type == "logSNR":
            lam_T = float(ns.marginal_lambda(jnp.float32(t_T)))
            lam_0 = float(ns.marginal_lambda(jnp.float32(t_0)))
            lams = np.linspace(lam_T, lam_0, N + 1).astype(np.float32)
            return np.asarray(ns.inverse_lambda(lams), dtype=np.float32)
        if skip_type == "time_quadratic":
            # The original builds t = linspace(t_0, t_T, 10**7) and takes, for
            # q = linspace(sqrt t_0, sqrt t_T, N + 1), the first grid point with
            # sqrt(t) >= q; computed in closed form here (float64).
            dt = (t_T - t_0) / (_QUADRATIC_GRID - 1)
            q = np.linspace(np.sqrt(t_0), np.sqrt(t_T), N + 1)
            idx = np.clip(np.ceil((q ** 2 - t_0) / dt - 1e-9), 0, _QUADRATIC_GRID - 1)
            ts = np.concatenate([t_0 + idx[:-1] * dt, [t_T]])
            return ts[::-1].astype(np.float32)
        raise ConfigError(f"unknown step spacing {skip_type!r} (known: {', '.join(SKIP_TYPES)})")

    def plan(self, nfe: int, order: int = 2, method: str = "singlestep", skip_type: str = "time_uniform",
             t_T: Optional[float] = None, t_0: Optional[float] = None) -> List[Step]:
        """The steps a sampler with `nfe` model evaluations takes.

        singlestep: nfe // order steps, all of `order` (nfe must be a
        multiple of the order; the original would silently drop the rest).
        multistep: nfe steps; the first step is order 1 (one previous value),
        and with fewer than 10 steps the last ones lower their order to
        finish (the official `lower_order_final`).
        t_T defaults to the schedule's T (1), t_0 to its 1/N.
        """
        _check(method, order, skip_type)
        nfe = int(nfe)
        t_T = self.schedule.T if t_T is None else float(t_T)
        t_0 = self.schedule.eps if t_0 is None else float(t_0)
        if method == "singlestep":
            if nfe < order or nfe % order:
                raise ConfigError(f"singlestep DPM-Solver-{order} takes {order} model evaluations per step: "
                                  f"NFE must be a positive multiple of {order}, got {nfe}")
            n = nfe // order
            ts = self.time_steps(skip_type, t_T, t_0, n)
            return [Step(float(ts[i]), float(ts[i + 1]), order) for i in range(n)]
        if nfe < order:
            raise ConfigError(f"multistep DPM-Solver-{order} needs at least {order} steps, got {nfe}")
        ts = self.time_steps(skip_type, t_T, t_0, nfe)
        steps = []
        for k in range(nfe):
            step = k + 1  # the original's loop index: the step that lands on ts[step]
            o = min(order, step)
            if nfe < 10:
                o = min(o, nfe + 1 - step)
            steps.append(Step(float(ts[k]), float(ts[k + 1]), o))
        return steps

    # ------------------------------------------------------------------ model output
    def data_prediction(self, eps, x, t):
        """x0 = (x - sigma_t eps) / alpha_t."""
        ns = self.schedule
        return (x - ns.marginal_std(t) * eps) / ns.marginal_alpha(t)

    def model_output(self, model_fn: Callable, x, t, slot: int):
        """The model's value in the solver's parameterisation: x0 (data prediction) or eps."""
        eps = model_fn(x, t, slot)
        return self.data_prediction(eps, x, t) if self.predict_x0 else eps

    # ------------------------------------------------------------------ singlestep updates
    def _times(self, s, t):
        ns = self.schedule
        s = jnp.asarray(s, jnp.float32)
        t = jnp.asarray(t, jnp.float32)
        return s, t, ns.marginal_lambda(s), ns.marginal_lambda(t)

    def first_update(self, model_fn, x, s, t, model_s=None):
        """DPM-Solver-1 (DDIM) from s to t."""
        ns = self.schedule
        s, t, lambda_s, lambda_t = self._times(s, t)
        h = lambda_t - lambda_s
        if model_s is None:
            model_s = self.model_output(model_fn, x, s, 0)
        if self.predict_x0:
            phi_1 = (jnp.exp(-h) - 1.0) / (-1.0)
            return (ns.marginal_std(t) / ns.marginal_std(s)) * x + (ns.marginal_alpha(t) * phi_1) * model_s
        phi_1 = jnp.expm1(h)
        log_alpha_s, log_alpha_t = ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(t)
        return jnp.exp(log_alpha_t - log_alpha_s) * x - (ns.marginal_std(t) * phi_1) * model_s

    def second_update(self, model_fn, x, s, t, r1: Optional[float] = None, model_s=None):
        """DPM-Solver-2 from s to t: one evaluation at s, one at the intermediate time s1 (lambda_s + r1 h)."""
        r1 = 0.5 if r1 is None else r1
        ns = self.schedule
        s, t, lambda_s, lambda_t = self._times(s, t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        log_alpha_s, log_alpha_s1, log_alpha_t = (ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(s1),
                                                  ns.marginal_log_mean_coeff(t))
        sigma_s, sigma_s1, sigma_t = ns.marginal_std(s), ns.marginal_std(s1), ns.marginal_std(t)
        alpha_s1, alpha_t = jnp.exp(log_alpha_s1), jnp.exp(log_alpha_t)
        if model_s is None:
            model_s = self.model_output(model_fn, x, s, 0)
        if self.predict_x0:
            phi_11 = jnp.expm1(-r1 * h)
            phi_1 = jnp.expm1(-h)
            x_s1 = (sigma_s1 / sigma_s) * x - (alpha_s1 * phi_11) * model_s
            model_s1 = self.model_output(model_fn, x_s1, s1, 1)
            if self.solver_type == "dpm_solver":
                return ((sigma_t / sigma_s) * x - (alpha_t * phi_1) * model_s
                        - (0.5 / r1) * (alpha_t * phi_1) * (model_s1 - model_s))
            return ((sigma_t / sigma_s) * x - (alpha_t * phi_1) * model_s
                    + (1.0 / r1) * (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * (model_s1 - model_s))
        phi_11 = jnp.expm1(r1 * h)
        phi_1 = jnp.expm1(h)
        x_s1 = jnp.exp(log_alpha_s1 - log_alpha_s) * x - (sigma_s1 * phi_11) * model_s
        model_s1 = self.model_output(model_fn, x_s1, s1, 1)
        if self.solver_type == "dpm_solver":
            return (jnp.exp(log_alpha_t - log_alpha_s) * x - (sigma_t * phi_1) * model_s
                    - (0.5 / r1) * (sigma_t * phi_1) * (model_s1 - model_s))
        return (jnp.exp(log_alpha_t - log_alpha_s) * x - (sigma_t * phi_1) * model_s
                - (1.0 / r1) * (sigma_t * ((jnp.exp(h) - 1.0) / h - 1.0)) * (model_s1 - model_s))

    def third_update(self, model_fn, x, s, t, r1: Optional[float] = None, r2: Optional[float] = None,
                     model_s=None):
        """DPM-Solver-3 from s to t: evaluations at s, s1 (lambda_s + r1 h) and s2 (lambda_s + r2 h)."""
        r1 = 1.0 / 3.0 if r1 is None else r1
        r2 = 2.0 / 3.0 if r2 is None else r2
        ns = self.schedule
        s, t, lambda_s, lambda_t = self._times(s, t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        s2 = ns.inverse_lambda(lambda_s + r2 * h)
        log_alpha_s, log_alpha_s1, log_alpha_s2, log_alpha_t = (
            ns.marginal_log_mean_coeff(s), ns.marginal_log_mean_coeff(s1), ns.marginal_log_mean_coeff(s2),
            ns.marginal_log_mean_coeff(t))
        sigma_s, sigma_s1, sigma_s2, sigma_t = (ns.marginal_std(s), ns.marginal_std(s1), ns.marginal_std(s2),
                                                ns.marginal_std(t))
        alpha_s1, alpha_s2, alpha_t = jnp.exp(log_alpha_s1), jnp.exp(log_alpha_s2), jnp.exp(log_alpha_t)
        if model_s is None:
            model_s = self.model_output(model_fn, x, s, 0)
        if self.predict_x0:
            phi_11 = jnp.expm1(-r1 * h)
            phi_12 = jnp.expm1(-r2 * h)
            phi_1 = jnp.expm1(-h)
            phi_22 = jnp.expm1(-r2 * h) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x_s1 = (sigma_s1 / sigma_s) * x - (alpha_s1 * phi_11) * model_s
            model_s1 = self.model_output(model_fn, x_s1, s1, 1)
            x_s2 = ((sigma_s2 / sigma_s) * x - (alpha_s2 * phi_12) * model_s
                    + r2 / r1 * (alpha_s2 * phi_22) * (model_s1 - model_s))
            model_s2 = self.model_output(model_fn, x_s2, s2, 2)
            if self.solver_type == "dpm_solver":
                return ((sigma_t / sigma_s) * x - (alpha_t * phi_1) * model_s
                        + (1.0 / r2) * (alpha_t * phi_2) * (model_s2 - model_s))
            d1_0 = (1.0 / r1) * (model_s1 - model_s)
            d1_1 = (1.0 / r2) * (model_s2 - model_s)
            d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
            return ((sigma_t / sigma_s) * x - (alpha_t * phi_1) * model_s
                    + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2)
        phi_11 = jnp.expm1(r1 * h)
        phi_12 = jnp.expm1(r2 * h)
        phi_1 = jnp.expm1(h)
        phi_22 = jnp.expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        phi_3 = phi_2 / h - 0.5
        x_s1 = jnp.exp(log_alpha_s1 - log_alpha_s) * x - (sigma_s1 * phi_11) * model_s
        model_s1 = self.model_output(model_fn, x_s1, s1, 1)
        x_s2 = (jnp.exp(log_alpha_s2 - log_alpha_s) * x - (sigma_s2 * phi_12) * model_s
                - r2 / r1 * (sigma_s2 * phi_22) * (model_s1 - model_s))
        model_s2 = self.model_output(model_fn, x_s2, s2, 2)
        if self.solver_type == "dpm_solver":
            return (jnp.exp(log_alpha_t - log_alpha_s) * x - (sigma_t * phi_1) * model_s
                    - (1.0 / r2) * (sigma_t * phi_2) * (model_s2 - model_s))
        d1_0 = (1.0 / r1) * (model_s1 - model_s)
        d1_1 = (1.0 / r2) * (model_s2 - model_s)
        d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
        return (jnp.exp(log_alpha_t - log_alpha_s) * x - (sigma_t * phi_1) * model_s
                - (sigma_t * phi_2) * d1 - (sigma_t * phi_3) * d2)

    def singlestep_update(self, model_fn, x, s, t, order: int, r1: Optional[float] = None,
                          r2: Optional[float] = None):
        """One singlestep update of the given order (1, 2 or 3) from s to t."""
        if order == 1:
            return self.first_update(model_fn, x, s, t)
        if order == 2:
            return self.second_update(model_fn, x, s, t, r1=r1)
        if order == 3:
            return self.third_update(model_fn, x, s, t, r1=r1, r2=r2)
        raise ConfigError(f"singlestep DPM-Solver order must be 1, 2 or 3, got {order}")

    # ------------------------------------------------------------------ multistep update
    def multistep_update(self, x, model_prev: Sequence, t_prev: Sequence, t, order: int):
        """One multistep update to t from the last `order` model values (oldest first).

        x is at t_prev[-1]; model_prev[i] is the model value at t_prev[i].
        Order 1 is DPM-Solver-1 with the stored value; order 2 is
        DPM-Solver(++)-2M.
        """
        ns = self.schedule
        t = jnp.asarray(t, jnp.float32)
        t_p0 = jnp.asarray(t_prev[-1], jnp.float32)
        lambda_p0, lambda_t = ns.marginal_lambda(t_p0), ns.marginal_lambda(t)
        if order == 1:
            return self.first_update(None, x, t_p0, t, model_s=model_prev[-1])
        if order != 2:
            raise ConfigError(f"multistep DPM-Solver order must be 1 or 2, got {order}")
        m1, m0 = model_prev[-2], model_prev[-1]
        t_p1 = jnp.asarray(t_prev[-2], jnp.float32)
        lambda_p1 = ns.marginal_lambda(t_p1)
        sigma_p0, sigma_t = ns.marginal_std(t_p0), ns.marginal_std(t)
        log_alpha_p0, log_alpha_t = ns.marginal_log_mean_coeff(t_p0), ns.marginal_log_mean_coeff(t)
        alpha_t = jnp.exp(log_alpha_t)
        h_0 = lambda_p0 - lambda_p1
        h = lambda_t - lambda_p0
        r0 = h_0 / h
        d1_0 = (1.0 / r0) * (m0 - m1)
        if self.predict_x0:
            phi_1 = jnp.expm1(-h)
            if self.solver_type == "dpm_solver":
                return (sigma_t / sigma_p0) * x - (alpha_t * phi_1) * m0 - 0.5 * (alpha_t * phi_1) * d1_0
            return (sigma_t / sigma_p0) * x - (alpha_t * phi_1) * m0 + (alpha_t * (phi_1 / h + 1.0)) * d1_0
        phi_1 = jnp.expm1(h)
        if self.solver_type == "dpm_solver":
            return (jnp.exp(log_alpha_t - log_alpha_p0) * x - (sigma_t * phi_1) * m0
                    - 0.5 * (sigma_t * phi_1) * d1_0)
        return (jnp.exp(log_alpha_t - log_alpha_p0) * x - (sigma_t * phi_1) * m0
                - (sigma_t * (phi_1 / h - 1.0)) * d1_0)

    # ------------------------------------------------------------------ a plain loop
    def _step_fn(self, model_fn, method: str, order: int, jit: bool):
        """One step of `sample` as a function of (x, ...) with traced times; jitted once per model and order."""
        key = (model_fn, method, order, jit)
        cache = self._step_fns
        if key not in cache:
            if method == "singlestep":
                def step(x, s, t):
                    return self.singlestep_update(model_fn, x, s, t, order)
            else:
                def step(x, prev, t_prev, s, t):
                    cur = self.model_output(model_fn, x, s, 0)
                    models, times = ((prev, cur), (t_prev, s)) if order == 2 else ((cur,), (s,))
                    return self.multistep_update(x, models, times, t, order), cur
            cache[key] = jax.jit(step) if jit else step
        return cache[key]

    def sample(self, model_fn: Callable, x, nfe: int, order: int = 2, method: str = "singlestep",
               skip_type: str = "time_uniform", t_T: Optional[float] = None, t_0: Optional[float] = None,
               jit: bool = True):
        """Solves from t_T to t_0 with `nfe` evaluations of `model_fn(x, t, slot) -> eps`.

        For models without a cache (see `l2c_jax.sampling.uvit` for the
        cached U-ViT loop). With jit=True each step is one jitted call,
        compiled once per (model_fn, order) and kept, so sampling again with
        the same model_fn does not recompile; model_fn must be traceable.
        """
        steps = self.plan(nfe, order, method, skip_type, t_T, t_0)
        x = jnp.asarray(x, jnp.float32)
        if method == "singlestep":
            for st in steps:
                x = self._step_fn(model_fn, method, st.order, jit)(x, jnp.float32(st.s), jnp.float32(st.t))
            return x
        prev, t_prev = jnp.zeros_like(x), jnp.float32(0)
        for st in steps:
            x, prev = self._step_fn(model_fn, method, st.order, jit)(x, prev, t_prev, jnp.float32(st.s),
                                                                     jnp.float32(st.t))
            t_prev = jnp.float32(st.s)
        return x
