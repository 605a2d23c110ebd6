"""The router-training losses of the original, as pure functions of the router.

Only `prob` (steps, 2*blocks) is differentiated; the model parameters enter as
constants, so the diffusion model stays frozen by construction.

DiT + DDIM (the original's `router_training_losses`): noise x0 to the full
step `t_index` (odd respaced index), take one full DDIM step to `t_index-1`,
which fills the cache, then at `t_index-1` compare the full model output with
the router-interpolated one (`beta*computed + (1-beta)*cached`, beta =
sigmoid(prob[t_index-1])): per-sample mean squared error over all channels,
plus `l1_weight * sum(beta)` of that row.

U-ViT + DPM-Solver-2 (the original's `LRouter` in
`U-ViT/train_router_discrete.py`): a random solver step k in
[0, steps - 2], noise x0 to the DISCRETE time n_k = round(1000 t_k) of its
start, take one full DPM-Solver-2 step (no guidance, the model at continuous
time x 1000) to t_{k+1}; its midpoint evaluation fills the cache. Then at
t_{k+1}, with the model given the INTEGER timestep round(1000 t_{k+1}),
compare the full output with the interpolated one using router row k+1:
per-sample SUM of squares over all latent elements, plus
`l1_weight * sum(beta)` of that row.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.sampling.forecast import derive, forecast_entry, forecast_order, shift_coefficients


def router_weights(prob_row, ste_threshold: Optional[float] = None):
    """(weights used in the interpolation, scores for the L1 term).

    With `ste_threshold`, the forward pass uses the hard mask `scores > thr`
    and the gradient passes straight through to the scores.
    """
    scores = jax.nn.sigmoid(prob_row)
    if ste_threshold is None:
        return scores, scores
    hard = (scores > ste_threshold).astype(scores.dtype)
    return scores + jax.lax.stop_gradient(hard - scores), scores


def dit_router_loss(prob, params, batch, *, model, diffusion, l1_weight: float,
                    ste_threshold: Optional[float] = None, period: int = 2, forecast: str = "copy", coefs=None,
                    anchors=None):
    """Returns (loss, aux). batch: x0 (B,H,W,C) latents, y (B,) labels already dropped
    to the null class where needed, noise (B,H,W,C), t_index () the respaced index of a full step.

    period 2 is the original's loss: one full DDIM step fills the cache, the next step is
    trained. A longer period rolls the sampler on from that real state through the period's
    period-1 cache steps, each with its own router row, the state advanced by the router's
    own (interpolated) output, and trains all those rows together against the full model:
    the data loss and the L1 term are means over the cache steps (steps past the end of
    sampling do not count). forecast "taylor1" / "taylor2": reused units are forecast by
    the one forecaster's rule (`l2c_jax.sampling.forecast`): the derivative terms come from
    the full computes at this and the `order` previous period starts (the anchors; real
    states from the same noise), and each cache step advances every unit's latest value
    along the Taylor polynomial (which telescopes to the sampler's forecast; `dit_period_roll`).

    coefs: (steps, units, 2) learned forecast coefficients (a router's `coefs`, differentiated with prob when
    trained): each cache step advances a unit by coefs[row, u] . (d1, d2) rather than by Taylor's step.

    anchors: (steps,) bool in sampling order, the full steps when they are placed rather than every
    period-th (`l2c_jax.schedule.anchor_layout`; `period` is then unused): the stretch from t_index to the
    next anchor is rolled, its derivative terms from the anchors before it, spaced as they are.

    Image-free (batch["states"], (B, steps, H, W, C) full-sampler states in sampling
    order, `l2c_jax.training.trajectories`): every state the loss would noise x0 to
    is the recorded one instead, the sampler's own state at that step.
    """
    rolled = dit_period_roll(prob, params, batch, model=model, diffusion=diffusion, ste_threshold=ste_threshold,
                             period=period, forecast=forecast, coefs=coefs, anchors=anchors)
    sg = jax.lax.stop_gradient
    data, l1s, mses, count = 0.0, 0.0, 0.0, 0.0
    for r in rolled:
        valid = r["valid"]
        mse = jnp.mean((sg(r["target"]) - r["pred"]) ** 2, axis=(1, 2, 3))
        data, l1s, mses, count = data + valid * jnp.mean(mse), l1s + valid * jnp.sum(r["scores"]), \
            mses + valid * mse, count + valid
    data_loss, l1, mse = data / count, l1s / count, mses / count
    loss = data_loss + l1_weight * l1
    return loss, dict(data_loss=data_loss, l1=l1, mse=mse)


def anchor_tables(steps: int, period: int = 2, anchors=None) -> dict:
    """Per sampler step s (sampling order), for an anchor: gap (steps to the next anchor, or to the end),
    prev1 / prev2 (the one and two anchors before it; -1: none). Also G, the longest gap, and `placed`
    (the anchors were given, not every period-th). Numpy, static."""
    placed = anchors is not None
    a = np.asarray(anchors, bool) if placed else np.arange(steps) % period == 0
    where = np.flatnonzero(a)
    gap, prev1, prev2 = np.zeros(steps, np.int32), np.full(steps, -1, np.int32), np.full(steps, -1, np.int32)
    gap[where] = np.diff(np.append(where, steps))
    prev1[where[1:]] = where[:-1]
    prev2[where[2:]] = where[:-2]
    return dict(anchors=a, gap=gap, prev1=prev1, prev2=prev2, G=int(gap.max()) if placed else int(period),
                placed=placed)


def dit_period_roll(prob, params, batch, *, model, diffusion, ste_threshold: Optional[float] = None,
                    period: int = 2, forecast: str = "copy", with_target: bool = True, coefs=None,
                    anchors=None) -> list:
    """The period `dit_router_loss` trains, rolled as the sampler would run it: per cache step j = 1..period-1,
    a dict of the state it starts from (x), the router's (interpolated) model output (pred), the full model's
    (target, when `with_target`), the router's scores, the state it leads to (x_next) and whether the step
    lies within sampling (valid). With hard router weights these are the sampler's own states and outputs.

    With placed `anchors` the roll runs to the longest stretch; steps past the drawn stretch are not
    evaluated (a conditional) and count as invalid."""
    x0, y, noise, t_index = batch["x0"], batch["y"], batch["noise"], batch["t_index"]
    states = batch.get("states")
    b = x0.shape[0]
    steps = diffusion.num_timesteps
    tmap = jnp.asarray(diffusion.timestep_map, jnp.int32)
    order = forecast_order(forecast)
    sg = jax.lax.stop_gradient
    tab = anchor_tables(steps, period, anchors)

    def t_of(i):
        return jnp.broadcast_to(tmap[i], (b,))

    def state_at(i):  # the state at respaced index i: x0 noised to it, or the recorded sampler state
        if states is None:
            return diffusion.q_sample(x0, i, noise)
        return jax.lax.dynamic_index_in_dim(states, steps - 1 - i, axis=1, keepdims=False)

    # One full DDIM step, as sampling would take it; nothing here depends on prob.
    x_t = state_at(t_index)
    out, cache = model.apply(params, x_t, t_of(t_index), y)
    x = sg(diffusion.ddim_step(out, x_t, t_index))
    cache = sg(cache)

    # A forecast's derivative terms, from the full computes at the previous anchors (absent before the first
    # step of sampling: that term is not known and counts 0), oldest first, spaced as the anchors are.
    s0 = steps - 1 - t_index
    d1 = d2 = None
    if order:
        prev = [jnp.asarray(tab["prev1"])[s0], jnp.asarray(tab["prev2"])[s0]][:order]
        values, known = [cache], []
        for p in prev:
            ic = steps - 1 - jnp.maximum(p, 0)
            _, c = model.apply(params, state_at(ic), t_of(ic), y)
            values.append(sg(c))
            known.append(p >= 0)
        # Spacings; where an anchor is unknown its term is 0 whatever the spacing (1 avoids dividing by 0).
        dts = [jnp.where(known[0], s0 - prev[0], 1).astype(jnp.float32)]
        if order == 2:
            dts.append(jnp.where(known[1], prev[0] - prev[1], 1).astype(jnp.float32))
        if not tab["placed"]:  # every period-th: the spacing is the period (as Python floats, as before)
            dts = [float(period)] * order
        if order == 1:
            d1 = [derive(v0, v1, None, dts[0], known[0], None)[0] for v0, v1 in zip(values[0], values[1])]
        else:
            d1_prev = [derive(v1, v2, None, dts[1], known[1], None)[0] for v1, v2 in zip(values[1], values[2])]
            d1, d2 = zip(*[derive(v0, v1, dp, dts[0], known[0], known[0] & known[1])
                           for v0, v1, dp in zip(values[0], values[1], d1_prev)])

    gap = jnp.asarray(tab["gap"])[s0]
    rolled = []
    for j in range(1, tab["G"]):
        i = t_index - j
        valid = ((j < gap) if tab["placed"] else (i >= 0)).astype(jnp.float32)
        ic = jnp.maximum(i, 0)
        weights, scores = router_weights(prob[ic], ste_threshold)
        cache_in = cache
        if order:  # each unit's latest value, advanced along its polynomial by one step (or as learned)
            def step(u):
                return shift_coefficients(j - 1, j) if coefs is None else (coefs[ic, u, 0], coefs[ic, u, 1])

            cache_in = tuple(forecast_entry(c, d1[u], None if d2 is None else d2[u], *step(u))
                             for u, c in enumerate(cache))

        def evaluate(x, cache_in, weights, ic=ic, cache=cache):
            target = model.apply(params, x, t_of(ic), y)[0] if with_target else None
            pred, new_cache = model.apply(params, x, t_of(ic), y, cache=cache_in, beta=weights)
            return target, pred, new_cache

        if tab["placed"]:  # past the drawn stretch: nothing to evaluate (zeros; every later step is past it too)
            shapes = jax.eval_shape(evaluate, x, cache_in, weights)

            def skip(*_, shapes=shapes):
                return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

            target, pred, new_cache = jax.lax.cond(valid > 0, evaluate, skip, x, cache_in, weights)
        else:
            target, pred, new_cache = evaluate(x, cache_in, weights)
        x_next = sg(diffusion.ddim_step(pred, x, ic))
        rolled.append(dict(x=x, pred=pred, target=target, scores=scores, x_next=x_next, valid=valid))
        x, cache = x_next, sg(new_cache)  # roll on: the state and the cache the sampler would carry
    return rolled


def dit_random_batch(key, x0, y, *, steps: int, null_class: int, label_dropout: float = 0.1, period: int = 2,
                     anchors=None):
    """The original's random draws for one DiT loss: a random full step for the whole batch
    (one of the period starts that has a cache step after it; period 2: a random odd respaced
    index, as the original; placed `anchors`: one of them with a cache step after it), Gaussian noise,
    and label dropout to the null class."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    if anchors is None:
        starts = -(-(steps - 1) // period)  # period starts (sampling order 0, period, ...) followed by a cache step
        t_index = (steps - 1) - period * (starts - 1 - jax.random.randint(k_t, (), 0, starts))
    else:
        a = np.asarray(anchors, bool)
        starts = np.flatnonzero(a & ~np.append(a[1:], True))
        t_index = (steps - 1) - jnp.asarray(starts, jnp.int32)[jax.random.randint(k_t, (), 0, len(starts))]
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    drop = jax.random.uniform(k_drop, y.shape) < label_dropout
    return dict(x0=x0, y=jnp.where(drop, null_class, y), noise=noise, t_index=t_index.astype(jnp.int32))


# ---------------------------------------------------------------------------
# U-ViT + DPM-Solver-2
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class UViTLossSchedule:
    """The solver and the time tables of U-ViT router training (hashes by identity).

    times: (steps + 1,) float32 continuous times t_0 = 1 > ... > t_steps of
    the sampler (DPM-Solver-2 singlestep: steps = NFE // 2). timesteps:
    round(N * times), the discrete timesteps (float32 arithmetic, as the
    original's `np.round(timesteps * 1000)`). sqrt_ac / sqrt_1m_ac: float32
    sqrt(alphas_cumprod[n]) and sqrt(1 - alphas_cumprod[n]) at those
    timesteps (computed in float64, then rounded, as the original's `stp`).
    """

    solver: object
    times: np.ndarray
    timesteps: np.ndarray
    sqrt_ac: np.ndarray
    sqrt_1m_ac: np.ndarray

    @classmethod
    def create(cls, nfe: int, schedule=None, skip_type: str = "time_uniform") -> "UViTLossSchedule":
        from l2c_jax.diffusion.dpm_solver import DPMSolver
        from l2c_jax.diffusion.vp import DiscreteVPSchedule

        nfe = int(nfe)
        if nfe < 4 or nfe % 2:
            raise ConfigError(f"U-ViT router training runs DPM-Solver-2 (2 evaluations per step) and needs at least "
                              f"2 solver steps: NFE must be an even number >= 4, got {nfe}")
        schedule = schedule if schedule is not None else DiscreteVPSchedule.stable_diffusion()
        solver = DPMSolver(schedule, predict_x0=True, solver_type="dpm_solver")
        plan = solver.plan(nfe, 2, "singlestep", skip_type)
        times = np.array([st.s for st in plan] + [plan[-1].t], dtype=np.float32)
        n = schedule.discrete_timesteps(times)
        ac = schedule.discrete_alphas_cumprod()  # float64, entry 0 = 1
        return cls(solver, times, n.astype(np.int32), np.sqrt(ac[n]).astype(np.float32),
                   np.sqrt(1.0 - ac[n]).astype(np.float32))

    @property
    def num_steps(self) -> int:
        return int(self.times.shape[0]) - 1


def uvit_router_loss(prob, params, batch, *, model, tables: UViTLossSchedule, l1_weight: float,
                     ste_threshold: Optional[float] = None):
    """Returns (loss, aux). batch: x0 (B,H,W,C) latents, y (B,) labels already dropped to the
    null class where needed (None for an unconditional U-ViT), eps (B,H,W,C) noise, step ()
    solver step k in [0, steps - 2]; the router row trained is k + 1. Image-free
    (batch["states"], (B, solver steps, H, W, C)): step k starts from the recorded state."""
    x0, y, eps, k = batch["x0"], batch.get("y"), batch["eps"], batch["step"]
    b = x0.shape[0]
    solver = tables.solver
    times = jnp.asarray(tables.times)
    if "states" in batch:  # image-free: the full sampler's recorded state at the start of step k
        x_t = jax.lax.dynamic_index_in_dim(batch["states"], k, axis=1, keepdims=False)
    else:
        x_t = jnp.asarray(tables.sqrt_ac)[k] * x0 + jnp.asarray(tables.sqrt_1m_ac)[k] * eps

    # One full DPM-Solver-2 step without guidance; the midpoint (last) evaluation's cache is kept.
    caches = {}

    def model_fn(x, t, slot):
        out, cache = model.apply(params, x, jnp.broadcast_to(solver.schedule.model_time(t), (b,)), y)
        caches[slot] = cache
        return out

    x_next = solver.second_update(model_fn, x_t, times[k], times[k + 1])
    cache = jax.lax.stop_gradient(caches[1])
    x_next = jax.lax.stop_gradient(x_next)

    t_next = jnp.broadcast_to(jnp.asarray(tables.timesteps)[k + 1].astype(jnp.float32), (b,))
    target, _ = model.apply(params, x_next, t_next, y)
    weights, scores = router_weights(prob[k + 1], ste_threshold)
    pred, _ = model.apply(params, x_next, t_next, y, cache=cache, beta=weights)

    sos = jnp.sum((jax.lax.stop_gradient(target) - pred) ** 2, axis=(1, 2, 3))
    l1 = jnp.sum(scores)
    data_loss = jnp.mean(sos)
    loss = data_loss + l1_weight * l1
    return loss, dict(data_loss=data_loss, l1=l1, sos=sos)


def uvit_random_batch(key, x0, y, *, steps: int, null_class: Optional[int], label_dropout: float = 0.1):
    """The original's random draws for one U-ViT loss: one solver step k uniform in
    [0, steps - 2] for the whole batch (`np.random.randint(0, len(order) - 1)`), Gaussian
    noise, and label dropout to the null class (the CFG dataset's p_uncond). `y` None or
    `null_class` None: an unconditional model, no labels."""
    k_step, k_noise, k_drop = jax.random.split(key, 3)
    step = jax.random.randint(k_step, (), 0, steps - 1).astype(jnp.int32)
    eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
    if y is None or null_class is None:
        y = None
    else:
        drop = jax.random.uniform(k_drop, y.shape) < label_dropout
        y = jnp.where(drop, null_class, y)
    return dict(x0=x0, y=y, eps=eps, step=step)
