"""The one forecaster: its rule, the sampler and the router loss forecasting alike, history kept only where read,
each step's forecast inside one compiled graph, and the schedule path every caller goes through."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from l2c_jax.errors import ConfigError
from l2c_jax.sampling.forecast import history_bytes, plan_forecast, step_entries, step_history

FAMILY = "dit"


def _trajectory(s, unit, curve=0.0):
    """A unit's value at step s: linear in s (both orders forecast it exactly), or bent by `curve` s^2."""
    return jnp.full((2, 3), 1.0 + unit) + (0.3 + 0.1 * unit) * s + curve * s * s


def _taylorseer(s, unit, masks, anchors, order, curve):
    """TaylorSeer's forecast written out directly: backward differences over the anchors, F(m) = v + d1 m +
    d2 m^2 / 2 from the last anchor; a unit recomputed since then carries its fresh value along F."""
    f = lambda t: np.asarray(_trajectory(t, unit, curve))  # noqa: E731
    a = [t for t in np.flatnonzero(anchors) if t <= s]
    d1 = (f(a[-1]) - f(a[-2])) / (a[-1] - a[-2]) if order >= 1 and len(a) >= 2 else 0.0
    d2 = 0.0
    if order >= 2 and len(a) >= 3:
        d2 = (d1 - (f(a[-2]) - f(a[-3])) / (a[-2] - a[-3])) / (a[-1] - a[-2])
    b = max(t for t in range(a[-1], s) if masks[t, unit])
    F = lambda m: d1 * m + d2 * m * m / 2  # noqa: E731
    return f(b) + F(s - a[-1]) - F(b - a[-1])


def _simulate(masks, anchors, order, dtype=jnp.float32, curve=0.0):
    """Runs a plan as the sampler does, with a 'model' whose units compute their exact trajectory and reuse
    what they are handed; returns the values handed over at every reuse, beside the exact ones."""
    plan = plan_forecast(masks, anchors, order)
    coef = {k: jnp.asarray(v) for k, v in plan.coeffs.items()}
    units = masks.shape[1]
    cache, hist, got, want = None, {}, [], []
    for s, st in enumerate(plan.steps):
        assert set(hist) == set(st.hist_in)  # exactly what the plan says comes in
        entries = step_entries(st, cache, hist, coef, s)
        values = []
        for u in range(units):
            if masks[s, u]:
                values.append(_trajectory(s, u, curve))
            else:
                e = entries[u]
                v = e.value(jnp.float32) if hasattr(e, "value") else e
                values.append(v)
                got.append(np.asarray(v))
                want.append(_taylorseer(s, u, masks, anchors, order, curve) if curve else
                            np.asarray(_trajectory(s, u)))
        hist = step_history(st, cache, tuple(values), hist, coef, s, dtype)
        assert set(hist) == set(st.hist_out)
        cache = tuple(values)
    return plan, np.array(got), np.array(want)


@pytest.mark.parametrize("period", [2, 3, 4])
@pytest.mark.parametrize("order", [1, 2])
def test_forecasts_are_taylorseers_and_exact_on_linear_trajectories(period, order):
    steps = 6 * period
    masks = np.zeros((steps, 2), bool)
    masks[::period] = True
    anchors = masks.all(1)
    _, got, want = _simulate(masks, anchors, order)
    n = int((~masks[period + 1:]).sum())  # from the second anchor on d1 is known: linear trajectories are exact
    np.testing.assert_allclose(got[-n:], want[-n:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[:1], want[:1])  # before two anchors a reuse can only copy
    _, got, want = _simulate(masks, anchors, order, curve=-0.05)  # bent: TaylorSeer's own formula
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
def test_a_unit_recomputed_inside_a_stretch_carries_its_fresh_value_along_the_polynomial(order):
    # Period 4; unit 1 is recomputed at some cache steps (a router would): its anchor value is kept as p.
    masks = np.zeros((16, 2), bool)
    masks[::4] = True
    masks[[9, 13, 14], 1] = True
    anchors = np.arange(16) % 4 == 0
    plan, got, want = _simulate(masks, anchors, order, curve=0.02)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert any(("p", 1) in st.hist_out for st in plan.steps)  # its previous anchor value, held where needed
    assert not any(("p", 0) in st.hist_out for st in plan.steps)


def test_history_is_kept_only_where_a_later_step_reads_it():
    masks = np.ones((12, 4), bool)
    masks[1:, 2] = np.arange(1, 12) % 3 == 0  # only unit 2 is ever reused
    anchors = np.arange(12) % 3 == 0
    masks[anchors] = True
    plan = plan_forecast(masks, anchors, 2)
    kept = {u for st in plan.steps for _, u in st.hist_out}
    assert kept == {2}
    assert plan.steps[-1].hist_out == ()  # nothing is read after the last step
    bytes_ = history_bytes(plan, (5, 7), jnp.bfloat16, jnp.float32)
    assert bytes_["kept"] == 2 * 5 * 7 * 2  # d1 and d2 of one unit, bfloat16
    assert bytes_["all_units"] == 3 * 4 * 5 * 7 * 4
    copy = plan_forecast(masks, anchors, 0)
    assert history_bytes(copy, (5, 7), jnp.float32, jnp.float32)["kept"] == 0
    with pytest.raises(ConfigError, match="anchor"):
        plan_forecast(masks, np.arange(12) % 3 == 1, 2)


# --------------------------------------------------------------------------- the sampler and the router loss


def _router_schedule(model, steps, period, order, seed=0):
    from l2c_jax.router import Router
    from l2c_jax.schedule import from_router

    prob = np.random.default_rng(seed).normal(0.0, 2.0, size=(steps, model.num_units)).astype(np.float32)
    router = Router(prob, "dit-ddim", threshold=0.5, period=period, forecast="copy" if not order else f"taylor{order}")
    return router, from_router(router, kind="dit-ddim", num_units=model.num_units, rows=steps)


@pytest.mark.parametrize("period", [2, 3, 4])
@pytest.mark.parametrize("order", [1, 2])
def test_the_router_loss_forecasts_as_the_sampler_does(model, io, period, order):
    """Given the sampler's own states, the loss's rolled period (hard router weights) reproduces the sampler's
    next states: its forecasts are the sampler's, cache-step recomputes included."""
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.sampling import DiTSampler
    from l2c_jax.training.losses import dit_period_roll

    steps = 12
    router, sched = _router_schedule(model, steps, period, order)
    assert sched.forecasts and (~sched.masks[1:]).any() and sched.masks[[s for s in range(steps) if s % period]].any()
    noise = jnp.asarray(io["ddim_noise"].transpose(0, 2, 3, 1))
    y = jnp.asarray(io["ddim_y"])
    states = []
    # "cond": one graph for the whole schedule (the forecast the same as "static"'s: the test above).
    out = DiTSampler(model, steps, strategy="cond")(noise, y, sched,
                                                    on_state=lambda s, x: states.append(np.asarray(x)))
    states.append(np.asarray(out))
    states = np.stack(states, 1)  # (B, steps + 1, H, W, C): the state each step starts from, then the result
    diffusion = create_diffusion(str(steps))
    prob = jnp.asarray(np.where(sched.masks[::-1], 30.0, -30.0), jnp.float32)  # row of index i = step steps-1-i
    roll = jax.jit(functools.partial(dit_period_roll, model=model, diffusion=diffusion, ste_threshold=0.5,
                                     period=period, forecast=f"taylor{order}", with_target=False))
    checked = 0
    for start in range(0, steps - 1, period):
        batch = dict(x0=jnp.zeros_like(noise), y=y, noise=noise, t_index=jnp.int32(steps - 1 - start),
                     states=jnp.asarray(states[:, :steps]))
        rolled = roll(prob, model.params, batch)
        for j, r in enumerate(rolled, start=1):
            if start + j >= steps:
                break
            assert rel_err(r["x_next"], states[:, start + j + 1]) < 1e-5, (start, j)
            checked += 1
    assert checked == steps - len(range(0, steps - 1, period))


@pytest.mark.slow
def test_forecasting_schedules_run_in_one_graph_per_step_compiled_once(model, io):
    """Every step of a forecasting schedule is one dispatch of one compiled graph (the forecast inside it):
    compiling the schedule ahead covers every graph, and sampling then compiles nothing (DDPM too)."""
    from l2c_jax.sampling import DiTSampler
    from test_sample_api import _CompileCounter

    noise = jnp.asarray(io["ddim_noise"].transpose(0, 2, 3, 1))
    y = jnp.asarray(io["ddim_y"])
    counter = _CompileCounter()
    _, sched = _router_schedule(model, 10, 3, 2)
    for solver, key in (("ddim", None), ("ddpm", jax.random.key(0))):
        smp = DiTSampler(model, 10, solver=solver, strategy="static")
        stats = smp.compile(noise.shape[0], sched)
        assert stats["graphs"] == len(smp.step_keys(sched)) > 1
        n = len(smp._compiled)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no unusable donations: every buffer given is updated in place
            smp(noise, y, sched, key=key)
            # Only the ahead-of-time executables ran (DDPM's too: lowered with their noise input) ...
            assert len(smp._compiled) == n and all(f._cache_size() == 0 for f in smp._compiled.values())
            # ... and a second call compiles nothing at all.
            assert counter.count(lambda: smp(noise, y, sched, key=key)) == 0


@pytest.mark.slow
def test_static_cond_and_auto_forecast_alike_and_history_dtype_is_close(model, io):
    from l2c_jax.sampling import DiTSampler

    noise = jnp.asarray(io["ddim_noise"].transpose(0, 2, 3, 1))
    y = jnp.asarray(io["ddim_y"])
    _, sched = _router_schedule(model, 8, 3, 2, seed=1)
    static = np.asarray(DiTSampler(model, 8, strategy="static")(noise, y, sched))
    cond = np.asarray(DiTSampler(model, 8, strategy="cond")(noise, y, sched))
    auto = DiTSampler(model, 8, strategy="auto")
    assert auto.schedule_of(sched).strategy == "static"  # forecasting schedules run static graphs
    np.testing.assert_allclose(cond, static, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(auto(noise, y, sched)), static)
    bf16 = np.asarray(DiTSampler(model, 8, history_dtype="bfloat16")(noise, y, sched))
    assert 0 < rel_err(bf16, static) < 1e-2
    copies = np.asarray(DiTSampler(model, 8)(noise, y, sched.masks))  # masks alone copy
    assert rel_err(copies, static) > 10 * rel_err(bf16, static)


@pytest.mark.slow
def test_the_schedule_path_serves_the_api_and_refuses_what_it_cannot_run(model, io):
    from l2c_jax.methods import Context, make_schedule
    from l2c_jax.sampling import DiTSampler, sample

    noise = jnp.asarray(io["ddim_noise"].transpose(0, 2, 3, 1))
    y = jnp.asarray(io["ddim_y"])
    ctx = Context(num_units=model.num_units, steps=10, router_schedule=None, changes=None)
    want = np.asarray(DiTSampler(model, 10)(noise, y, make_schedule(ctx, "taylorseer", "3/2")))
    got = np.asarray(sample(model, noise, y, steps=10, schedule="taylorseer:3/2"))
    np.testing.assert_array_equal(got, want)
    fewer = np.asarray(sample(model, noise, y, steps=10, schedule="fewer_steps:4"))
    np.testing.assert_array_equal(fewer, np.asarray(sample(model, noise, y, steps=4)))
    router, sched = _router_schedule(model, 10, 3, 1)
    np.testing.assert_array_equal(np.asarray(sample(model, noise, y, steps=10, router=router)),
                                  np.asarray(DiTSampler(model, 10)(noise, y, sched)))  # the router's forecast kept
    with pytest.raises(ConfigError, match="needs a router"):
        sample(model, noise, y, steps=10, schedule="l2c")
    with pytest.raises(ConfigError, match="unknown caching method"):
        sample(model, noise, y, steps=10, schedule="fastcache:2")
    with pytest.raises(ConfigError, match="one of schedule, router or masks"):
        sample(model, noise, y, steps=10, schedule="fora:2", masks=sched.masks)
    for bad in (5.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            sample(model, noise, y, steps=10, router=router, threshold=bad)
    for bad in (float("nan"), float("inf"), "four"):  # a NaN scale sampled NaN images with exit 0
        with pytest.raises(ConfigError, match="cfg_scale"):
            sample(model, noise, y, steps=10, cfg_scale=bad)


def test_a_dit_without_a_null_class_row_refuses_guidance_and_the_null_label():
    import dataclasses

    from l2c_jax.model import Model
    from l2c_jax.models.dit import DiTConfig
    from l2c_jax.sampling import DiTSampler

    cfg = DiTConfig(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                    num_classes=5, class_dropout_prob=0.0)
    model = Model.random("dit", cfg)
    noise = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ConfigError, match="null-class row"):
        DiTSampler(model, 4, cfg_scale=4.0)
    with pytest.raises(ConfigError, match="no null-class row"):
        DiTSampler(model, 4)(noise, jnp.array([0, 5]))
    assert np.isfinite(np.asarray(DiTSampler(model, 4)(noise, jnp.array([0, 4])))).all()
    with_row = Model.random("dit", dataclasses.replace(cfg, class_dropout_prob=0.1))
    assert np.isfinite(np.asarray(DiTSampler(with_row, 4, cfg_scale=4.0)(noise, jnp.array([0, 5])))).all()
