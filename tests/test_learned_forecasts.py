"""Learned forecasts: a router that learns, per row and unit, the coefficients of d1 and d2 a reused unit is
advanced by. Started at Taylor's own, it samples exactly as TaylorSeer's rule does; learned, the router loss
and the sampler still forecast alike; the coefficients travel in the router file (format 2) and retarget."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.router import Router, load_router, save_router
from l2c_jax.schedule import anchor_layout, from_router
from l2c_jax.training.objectives import taylor_coefs

FAMILY = "dit"


@pytest.fixture(scope="module")
def digits():
    """The shipped digits DiT, 4 noises and labels: a trained model, whose units' forecasts matter (the tiny
    random fixture model's reused units move its samples by 1e-6 at most)."""
    from l2c_jax.model import load_model
    from l2c_jax.resources import asset

    return load_model(asset("digits", "dit")), jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), jnp.arange(4)


def _router(units, steps, period, order, learned, seed=0, anchors=None):
    rng = np.random.default_rng(seed)
    prob = rng.normal(0.0, 2.0, size=(steps, units)).astype(np.float32)
    coefs = None
    if learned is not None:
        coefs = taylor_coefs(steps, units, period, None if anchors is None else anchor_layout(anchors, steps))
        if learned:  # moved away from Taylor's, differently per row and unit
            coefs = coefs + rng.normal(0.0, 0.4, size=coefs.shape).astype(np.float32)
    placed = None if anchors is None else tuple(np.flatnonzero(anchor_layout(anchors, steps)).tolist())
    return Router(prob, "dit-ddim", threshold=0.5, period=period, forecast=f"taylor{order}", coefs=coefs,
                  anchors=placed)


def _sampled(router, steps, model, noise, y):
    """The router's schedule, the sampler's states on it (B, steps + 1, ...), the diffusion, and router logits
    whose hard weights are the schedule's masks (what the loss's roll needs to replay the sampler)."""
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.sampling import DiTSampler

    sched = from_router(router, kind="dit-ddim", num_units=model.num_units, rows=steps)
    states = []
    out = DiTSampler(model, steps)(noise, y, sched, on_state=lambda s, x: states.append(np.asarray(x)))
    states = np.stack(states + [np.asarray(out)], 1)
    diffusion = create_diffusion(str(steps), learn_sigma=model.config.learn_sigma)
    prob = jnp.asarray(np.where(sched.masks[::-1], 30.0, -30.0), jnp.float32)
    return sched, states, diffusion, prob


def test_taylor_coefficients_are_the_forecasters_own_step():
    c = taylor_coefs(9, 2, 4)  # row 8 is step 0 (a period start), row 7 step 1, ...
    np.testing.assert_array_equal(c[8], 0.0)
    np.testing.assert_array_equal(c[7], [[1.0, 0.5]] * 2)  # F(1) - F(0): d1 + d2 / 2
    np.testing.assert_array_equal(c[5], [[1.0, 2.5]] * 2)  # step 3: F(3) - F(2) = d1 + 5 d2 / 2
    np.testing.assert_array_equal(c[4], 0.0)  # step 4 starts the next period


def test_the_coefficients_travel_in_the_router_file_and_retarget(tmp_path):
    r = _router(6, 12, 3, 2, learned=True)
    assert "(learned)" in r.describe()
    back = load_router(save_router(r, str(tmp_path / "r.safetensors")))
    np.testing.assert_array_equal(back.coefs, r.coefs)
    assert load_router(save_router(_router(6, 12, 3, 2, None), str(tmp_path / "plain"))).coefs is None
    from l2c_jax.retarget import retarget
    moved = retarget(r, 24)
    assert moved.coefs.shape == (24, 6, 2)
    # Interpolated from rows of the same position in the period: the first cache step after a period start
    # keeps Taylor's d1 coefficient wherever the source's first cache steps all had it.
    same = _router(6, 12, 3, 2, learned=False)
    np.testing.assert_allclose(retarget(same, 24).coefs, taylor_coefs(24, 6, 3), atol=1e-6)
    bad = [dict(coefs=np.zeros((12, 6, 3))), dict(coefs=np.full((12, 6, 2), np.nan)),
           dict(coefs=np.zeros((12, 6, 2)), forecast="copy")]
    for kw in bad:
        with pytest.raises(ConfigError):
            Router(r.prob, "dit-ddim", period=3, **dict(dict(forecast="taylor2"), **kw))
    # A file whose coefficients do not match its rows is refused in one line.
    from safetensors.numpy import save_file
    path = str(tmp_path / "bad.safetensors")
    with __import__("safetensors").safe_open(str(tmp_path / "r.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    save_file({"prob": r.prob, "forecast_coefs": np.zeros((11, 6, 2), np.float32)}, path, metadata=meta)
    with pytest.raises(CheckpointError, match="forecast_coefs has shape"):
        load_router(path)


def test_taylors_coefficients_sample_exactly_as_taylorseer(digits):
    from l2c_jax.sampling import DiTSampler

    model, noise, y = digits
    plain = _router(model.num_units, 10, 3, 2, None, seed=1)
    init = _router(model.num_units, 10, 3, 2, False, seed=1)
    learned = _router(model.num_units, 10, 3, 2, True, seed=1)
    sched = {k: from_router(r, kind="dit-ddim", num_units=model.num_units, rows=10)
             for k, r in dict(plain=plain, init=init, learned=learned).items()}
    assert sched["init"].coefficients is not None and sched["init"].key() != sched["plain"].key()
    smp = DiTSampler(model, 10)
    want = np.asarray(smp(noise, y, sched["plain"]))
    np.testing.assert_array_equal(np.asarray(smp(noise, y, sched["init"])), want)
    got = np.asarray(smp(noise, y, sched["learned"]))
    assert rel_err(got, want) > 1e-3  # the coefficients are used
    cond = np.asarray(DiTSampler(model, 10, strategy="cond")(noise, y, sched["learned"]))
    np.testing.assert_allclose(cond, got, atol=1e-5)


@pytest.mark.parametrize("period, order", [(3, 2), (4, 1)])
def test_the_router_loss_forecasts_with_learned_coefficients_as_the_sampler_does(digits, period, order):
    """The loss's rolled period (hard router weights), given the sampler's own states and the router's learned
    coefficients, reproduces the sampler's next states; the coefficients of cache rows get gradients."""
    from l2c_jax.training.losses import dit_period_roll, dit_router_loss

    steps = 12
    model, noise, y = digits
    router = _router(model.num_units, steps, period, order, True, seed=2)
    sched, states, diffusion, prob = _sampled(router, steps, model, noise, y)
    coefs = jnp.asarray(router.coefs)
    roll = jax.jit(functools.partial(dit_period_roll, model=model, diffusion=diffusion, ste_threshold=0.5,
                                     period=period, forecast=f"taylor{order}", with_target=False))
    checked, taylors = 0, []
    for start in range(0, steps - 1, period):
        batch = dict(x0=jnp.zeros_like(noise), y=y, noise=noise, t_index=jnp.int32(steps - 1 - start),
                     states=jnp.asarray(states[:, :steps]))
        plain = roll(prob, model.params, batch)  # Taylor's coefficients: not what the sampler ran
        for j, r in enumerate(roll(prob, model.params, batch, coefs=coefs), start=1):
            if start + j < steps:
                assert rel_err(r["x_next"], states[:, start + j + 1]) < 1e-5, (start, j)
                taylors.append(rel_err(plain[j - 1]["x_next"], states[:, start + j + 1]))
                checked += 1
    assert checked == steps - len(range(0, steps - 1, period))
    assert max(taylors) > 1e-3  # the check can tell the learned coefficients from Taylor's

    start = steps - 1 - 2 * period  # the third period start: d1 and d2 both known
    batch = dict(x0=jnp.zeros_like(noise), y=y, noise=noise, t_index=jnp.int32(start),
                 states=jnp.asarray(states[:, :steps]))
    grad = jax.grad(lambda c: dit_router_loss(jnp.asarray(router.prob), model.params, batch, model=model,
                                              diffusion=diffusion, l1_weight=0.0, period=period,
                                              forecast=f"taylor{order}", coefs=c)[0])(coefs)
    grad = np.asarray(grad)
    rows = np.flatnonzero(np.abs(grad).sum((1, 2)) > 0)
    np.testing.assert_array_equal(rows, [start - j for j in range(period - 1, 0, -1)])
    assert (np.abs(grad[..., 1]).sum() > 0) == (order == 2)  # order 1 never reads d2


@pytest.mark.slow
def test_a_router_learns_its_forecast_and_samples_with_it(tmp_path, digits):
    layout = "warp20^0.9@48"
    """docs/learned_forecasts.md's three commands as written (tests/docs_blocks.py), short: TaylorSeer samples on
    a placed layout; a router trains on it, the coefficients of its cache rows move from Taylor's (those of
    full steps never enter a loss), and it samples."""
    import json

    from docs_blocks import run_block
    run_block("learned", tmp_path, append={
        1: "--config.num_samples=8 --config.batch_size=8",
        # Gaps of at most 4 steps rather than the documented layout's 8: the loss unrolls the longest gap, and
        # compiling 8 steps of it takes two minutes here.
        2: "--config.train.steps=4 --config.train.batch_size=8 --config.train.log_every=2 "
           f"--config.train.checkpoint_every=4 --config.router.anchors={layout}",
        3: "--config.num_samples=8 --config.batch_size=8 --config.strategy=cond"})  # one graph for 50 steps
    placed = json.load(open(tmp_path / "out" / "digits_ddim50" / "report.json"))
    assert placed["num_images"] == 8 and placed["forecast"] == "taylor2"
    router = load_router(str(tmp_path / "runs" / "w13"))
    assert router.forecast == "taylor2" and router.coefs is not None
    assert router.anchors == tuple(np.flatnonzero(anchor_layout(layout, 50)).tolist())
    start = taylor_coefs(50, router.num_units, anchors=anchor_layout(layout, 50))
    moved = np.flatnonzero(np.abs(router.coefs - start).max((1, 2)) > 0)
    assert len(moved) > 0 and set(moved.tolist()) <= set(router.cache_rows())
    report = json.load(open(tmp_path / "out" / "digits_ddim50_l2c" / "report.json"))
    assert report["num_images"] == 8 and report["forecast"] == "taylor2"

    from l2c_jax.configs.router_digits import get_config
    from l2c_jax.training.objectives import dit_objective
    copies = get_config("20_k4")
    copies.router.learn_forecast = True
    with pytest.raises(ConfigError, match="learn_forecast"):  # nothing to learn where reused units are copied
        dit_objective(digits[0], copies)


# --------------------------------------------------------------------------- placed anchors


def test_anchor_layouts_place_the_full_steps_and_refuse_bad_specs():
    np.testing.assert_array_equal(np.flatnonzero(anchor_layout("4", 10)), [0, 4, 8])
    np.testing.assert_array_equal(np.flatnonzero(anchor_layout("warp13^0.7@47", 50)),
                                  [0, 8, 13, 18, 22, 25, 29, 32, 35, 38, 41, 44, 47])
    np.testing.assert_array_equal(np.flatnonzero(anchor_layout("warp3^1", 5)), [0, 2, 4])
    np.testing.assert_array_equal(np.flatnonzero(anchor_layout("0,3,4", 6)), [0, 3, 4])
    for bad in ("warp13^0.1@12", "warp1^1", "warp3^1@9", "1,3", "0,3,3", "0,8", "0", "x", "-2"):
        with pytest.raises(ConfigError, match="anchor layout"):
            anchor_layout(bad, 8)


def test_placed_anchors_travel_in_the_router_file_and_do_not_retarget(tmp_path):
    r = _router(6, 12, 2, 2, True, anchors="0,5,8,10")
    assert r.cache_steps() == [1, 2, 3, 4, 6, 7, 9, 11] and "4 full steps at 0,5,8,10" in r.describe()
    back = load_router(save_router(r, str(tmp_path / "r.safetensors")))
    assert back.anchors == (0, 5, 8, 10)
    np.testing.assert_array_equal(back.masks(), r.masks())
    s = from_router(back, kind="dit-ddim", num_units=6, rows=12)
    np.testing.assert_array_equal(np.flatnonzero(s.anchors), [0, 5, 8, 10])
    assert s.masks[[0, 5, 8, 10]].all()
    from l2c_jax.retarget import retarget
    with pytest.raises(ConfigError, match="placed anchors do not retarget"):
        retarget(r, 20)
    for bad in ((1, 4), (0, 4, 4), (0, 12), tuple(range(12))):
        with pytest.raises(ConfigError, match="router anchors"):
            Router(r.prob, "dit-ddim", anchors=bad)
    with pytest.raises(ConfigError, match="only dit-ddim"):
        Router(np.zeros((10, 6), np.float32), "uvit-dpm2", anchors=(0, 3))


def test_a_periodic_layout_placed_gives_the_periods_loss(digits):
    """The placed-anchors roll (conditionals, spacings from tables) on anchors every 3rd step is the period-3
    loss, value and gradient."""
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.training.losses import dit_router_loss

    model, noise, y = digits
    steps = 10
    diffusion = create_diffusion(str(steps), learn_sigma=model.config.learn_sigma)
    r = _router(model.num_units, steps, 3, 2, True, seed=4)
    x0 = jax.random.normal(jax.random.key(1), noise.shape)
    prob, coefs = jnp.asarray(r.prob), jnp.asarray(r.coefs)

    def loss(prob, t_index, **kw):
        batch = dict(x0=x0, y=y, noise=noise, t_index=t_index)
        return dit_router_loss(prob, model.params, batch, model=model, diffusion=diffusion, l1_weight=1e-3,
                               forecast="taylor2", coefs=coefs, **kw)[0]

    period = jax.jit(jax.value_and_grad(functools.partial(loss, period=3)))
    placed = jax.jit(jax.value_and_grad(functools.partial(loss, anchors=anchor_layout("3", steps))))
    for t_index in (9, 3):  # sampler steps 0 and 6 (d1 and d2 known)
        want, gwant = period(prob, jnp.int32(t_index))
        got, ggot = placed(prob, jnp.int32(t_index))
        assert rel_err(got, want) < 1e-6 and rel_err(ggot, gwant) < 1e-5


def test_the_router_loss_forecasts_over_placed_anchors_as_the_sampler_does(digits):
    """Anchors placed unevenly (stretches of 4, 1, 3, 2 and 2 steps): the loss's roll from each anchor, given
    the sampler's states, reproduces the sampler's next states, with learned coefficients and d2 spaced by
    the anchors' own gaps; draws fall only on anchors followed by a cache step."""
    from l2c_jax.training.losses import dit_period_roll, dit_random_batch

    steps, spec = 12, "0,4,5,8,10"
    model, noise, y = digits
    placed = anchor_layout(spec, steps)
    router = _router(model.num_units, steps, 2, 2, True, seed=3, anchors=spec)
    sched, states, diffusion, prob = _sampled(router, steps, model, noise, y)
    roll = jax.jit(functools.partial(dit_period_roll, model=model, diffusion=diffusion, ste_threshold=0.5,
                                     forecast="taylor2", with_target=False, anchors=placed))
    checked = 0
    for start in (0, 5, 8, 10):  # 4 has no cache step after it
        batch = dict(x0=jnp.zeros_like(noise), y=y, noise=noise, t_index=jnp.int32(steps - 1 - start),
                     states=jnp.asarray(states[:, :steps]))
        rolled = roll(prob, model.params, batch, coefs=jnp.asarray(router.coefs))
        assert len(rolled) == 3  # the longest stretch (0..3) sets the roll
        for j, r in enumerate(rolled, start=1):
            if not placed[start + 1:start + j + 1].any() and start + j < steps:
                assert float(r["valid"]) == 1.0
                assert rel_err(r["x_next"], states[:, start + j + 1]) < 1e-5, (start, j)
                checked += 1
            else:
                assert float(r["valid"]) == 0.0
    assert checked == steps - placed.sum()
    drawn = {int(dit_random_batch(jax.random.key(k), noise, y, steps=steps, null_class=10, anchors=placed)
                 ["t_index"]) for k in range(60)}
    assert drawn == {steps - 1 - s for s in (0, 5, 8, 10)}
