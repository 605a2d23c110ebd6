"""Cache periods longer than two and forecasts in router training (period 2 stays the original's loss and
draws: tests/test_train_router.py checks it against the original's outputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from l2c_jax.errors import ConfigError
from l2c_jax.router import Router, load_router, save_router

FAMILY = "dit"


def test_a_period_k_router_caches_all_but_every_kth_step(tmp_path):
    prob = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    r = Router(prob, "dit-ddim", threshold=0.5, period=3, forecast="taylor1")
    assert r.cache_steps() == [1, 2, 4, 5, 7, 8]
    m = r.masks()
    assert m.shape == (10, 6) and m[[0, 3, 6, 9]].all()
    np.testing.assert_array_equal(m[1], r.beta()[8] > 0.5)  # step s uses row steps-1-s
    back = load_router(save_router(r, str(tmp_path / "r.safetensors")))
    assert (back.period, back.forecast) == (3, "taylor1") and "cache period 3" in back.describe()
    np.testing.assert_array_equal(back.masks(), m)
    # Period 2 is the original's layout; the released file format holds nothing else.
    assert load_router(fixture_path("routers", "DDIM20_router.pt")).period == 2
    from l2c_jax.router import torch_state_dict
    with pytest.raises(ConfigError, match="period-2 copy routers"):
        torch_state_dict(r)
    for bad in (dict(period=1), dict(period=3, kind="uvit-dpm2"), dict(forecast="taylor3")):
        with pytest.raises(ConfigError):
            Router(prob, **dict(dict(kind="dit-ddim"), **bad))
    odd = Router(prob[:9], "dit-ddim", threshold=0.5, period=3)  # any step count for k > 2
    assert odd.masks().shape == (9, 6)


def test_period_two_draws_exactly_the_original_full_steps():
    from l2c_jax.training.losses import dit_random_batch

    x0, y = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,), jnp.int32)
    for seed in range(20):
        key = jax.random.key(seed)
        got = int(dit_random_batch(key, x0, y, steps=20, null_class=10)["t_index"])
        want = int(jax.random.randint(jax.random.split(key, 3)[0], (), 0, 10) * 2 + 1)  # the original's draw
        assert got == want
    starts = {int(dit_random_batch(jax.random.key(s), x0, y, steps=20, null_class=10, period=3)["t_index"])
              for s in range(200)}
    assert starts == {19 - 3 * p for p in range(7)}  # every period start followed by a cache step


@pytest.mark.parametrize("forecast", ["copy", "taylor1", "taylor2"])
def test_a_period_trains_the_rows_of_its_cache_steps(model, io, forecast):
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.training.losses import dit_router_loss

    diffusion = create_diffusion("10")
    b = dict(x0=jnp.asarray(io["train_x0"].transpose(0, 2, 3, 1)), y=jnp.asarray(io["train_y"]),
             noise=jnp.asarray(io["train_noise"].transpose(0, 2, 3, 1)))
    prob = jnp.asarray(np.random.default_rng(0).normal(size=(10, model.num_units)), jnp.float32)

    def loss(p, t_index, period):
        return dit_router_loss(p, model.params, dict(b, t_index=jnp.int32(t_index)), model=model,
                               diffusion=diffusion, l1_weight=1e-3, period=period, forecast=forecast)

    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(prob, 6, 3)
    trained = np.flatnonzero(np.abs(np.asarray(grad)).sum(1) > 0)
    np.testing.assert_array_equal(trained, [4, 5])  # the two cache steps after the full step at index 6
    assert np.isfinite(float(value)) and aux["mse"].shape == (b["x0"].shape[0],)
    # Near the end only the steps that exist count: a full step at index 1 leaves one cache step (index 0).
    _, grad = jax.value_and_grad(loss, has_aux=True)(prob, 1, 3)
    np.testing.assert_array_equal(np.flatnonzero(np.abs(np.asarray(grad)).sum(1) > 0), [0])


@pytest.mark.slow
def test_period_routers_train_and_sample_end_to_end(tmp_path):
    """docs/cache_periods.md's two commands as written (tests/docs_blocks.py), short: a period-4 router
    with second-order forecasts trains, then samples forecasting by itself."""
    import json

    from docs_blocks import run_block
    run_block("periods", tmp_path, append={
        1: "--config.train.steps=6 --config.train.batch_size=16 --config.train.log_every=3 "
           "--config.train.checkpoint_every=6",
        2: "--config.num_samples=8 --config.batch_size=8 --config.strategy=cond"})  # one graph for 50 steps
    router = load_router(str(tmp_path / "runs" / "k4t2" / "router.safetensors"))
    assert (router.steps, router.period, router.forecast) == (50, 4, "taylor2")
    # Which rows trained: only cache steps' rows moved from the trainer's torch.randn-like start; the rows of
    # the period starts (full steps) were never in a loss.
    seed = json.load(open(tmp_path / "runs" / "k4t2" / "config.json"))["seed"]
    start = np.asarray(jax.random.normal(jax.random.key(int(seed) + 1), router.prob.shape, jnp.float32))
    moved = np.flatnonzero(np.abs(np.asarray(router.prob) - start).max(1) > 0)
    assert len(moved) > 0 and set(moved.tolist()) <= set(router.cache_rows()), (moved, router.cache_rows())
    report = json.load(open(tmp_path / "out" / "digits_ddim50_l2c" / "report.json"))
    assert report["num_images"] == 8 and report["computed_share"] == pytest.approx(router.masks().mean())
    assert report["forecast"] == "taylor2" and 0 < report["history_bytes"] <= report["history_bytes_all_units"]
