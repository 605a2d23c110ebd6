"""U-ViT router training: the original's loss (DPM-Solver-2 step, shifted cache, sum of squares), a short run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, rel_err, ROOT, fixture_path
from l2c_jax.errors import ConfigError
from l2c_jax.router import load_router
from l2c_jax.training.losses import UViTLossSchedule, uvit_random_batch, uvit_router_loss


FAMILY = "uvit"  # the reference fixtures behind io / model / router (conftest)


def test_uvit_loss_and_gradient_match_the_original(model, io):
    nfe = int(io["dpm_nfe"])
    router = load_router(fixture_path("uvit", "uvit_tiny_router_dpm10.pth"))
    tables = UViTLossSchedule.create(nfe)
    np.testing.assert_array_equal(tables.times, io["solver_timesteps"])
    np.testing.assert_array_equal(tables.timesteps, [1000, 800, 600, 401, 201, 1])
    k = int(io["train_step"])
    batch = dict(x0=nhwc(io["train_x0"]), y=jnp.asarray(io["train_y"]), eps=nhwc(io["train_eps"]),
                 step=jnp.int32(k))
    fn = lambda p: uvit_router_loss(p, model.params, batch, model=model, tables=tables,  # noqa: E731
                                    l1_weight=float(io["train_l1_weight"]))
    (loss, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(router.prob))
    assert rel_err(aux["sos"], io["train_data_loss"]) < 1e-4  # per-sample sums of squares
    assert rel_err(aux["data_loss"], io["train_data_loss"].mean()) < 1e-4
    assert rel_err(aux["l1"], io["train_l1"]) < 1e-6
    assert rel_err(loss, io["train_loss"]) < 1e-4
    assert grad.shape == (nfe, model.num_units)
    assert rel_err(grad, io["train_router_grad"]) < 1e-4
    # only router row k+1 (the first evaluation of the next solver step) receives gradient
    assert np.all(np.asarray(grad)[np.arange(nfe) != k + 1] == 0) and np.abs(np.asarray(grad)[k + 1]).max() > 0


def test_random_draws_follow_the_original():
    x0 = jnp.zeros((64, 8, 8, 4))
    y = jnp.arange(64) % 10
    draw = jax.jit(jax.vmap(lambda k: uvit_random_batch(k, x0[:1], y[:1], steps=5, null_class=10)["step"]))
    steps = np.asarray(draw(jax.random.split(jax.random.key(0), 200)))
    assert set(steps.tolist()) == {0, 1, 2, 3}  # np.random.randint(0, len(order) - 1): never the last solver step
    b = uvit_random_batch(jax.random.key(0), x0, y, steps=5, null_class=10, label_dropout=0.5)
    dropped = np.asarray(b["y"]) == 10
    assert 0 < dropped.sum() < 64 and np.all(np.asarray(b["y"])[~dropped] == np.asarray(y)[~dropped])
    assert uvit_random_batch(jax.random.key(0), x0, y, steps=5, null_class=None)["y"] is None
    for nfe in (2, 7):
        with pytest.raises(ConfigError, match="even number >= 4"):
            UViTLossSchedule.create(nfe)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, model):
    """The fixture U-ViT and LDM-named VAE converted, and a generated image folder (16x16 -> 8x8x4 latents)."""
    from PIL import Image

    from l2c_jax.convert.vae import convert_vae

    root = tmp_path_factory.mktemp("uvit_train")
    model.save(str(root / "uvit"))
    vae, naming, _ = convert_vae(fixture_path("vae", "vae_tiny_ldm.pth"))
    assert naming == "ldm"
    vae.save(str(root / "vae"))
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "images" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (18 + i, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def uvit_args(setup, workdir, steps, extra=()):
    return ["--config", os.path.join(ROOT, "configs", "router_uvit.py"), "--workdir", str(workdir),
            f"--config.model.checkpoint={setup / 'uvit'}", f"--config.vae.checkpoint={setup / 'vae'}",
            f"--config.data.image_folder={setup / 'images'}", "--config.data.image_size=16",
            "--config.sampler.steps=10", "--config.train.batch_size=4", f"--config.train.steps={steps}",
            "--config.train.lr=0.05", "--config.train.log_every=3", "--config.train.checkpoint_every=3",
            *extra]


@pytest.fixture(scope="module")
def six_step_run(tiny_setup, tmp_path_factory):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.training.trainer import train_router

    config, workdir = parse_config_flags(uvit_args(tiny_setup, tmp_path_factory.mktemp("run") / "w", 6))
    return config, workdir, train_router(config, workdir, report=lambda *_: None)


@pytest.mark.slow
def test_short_uvit_run_trains_the_cache_rows_and_writes_a_router(six_step_run):
    from PIL import Image

    config, workdir, out = six_step_run
    assert config.train.clamp is None and config.train.l1 == 0.1 and config.router.threshold == 0.9
    hist = out["history"]
    assert [h["step"] for h in hist] == [3, 6]
    assert all(np.isfinite(h["loss"]) and 0.0 <= h["computed_share"] <= 1.0 for h in hist)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    router = load_router(workdir, kind="uvit-dpm2")
    assert router.kind == "uvit-dpm2" and router.steps == 10 and router.num_units == 10
    assert router.threshold == 0.9 and router.masks().shape == (5, 10)
    # NFE rows as the released routers; only rows 1..4 (the cache steps' rows; each step trains the row
    # of one random solver step) move from the N(0, 1) init
    init = np.asarray(jax.random.normal(jax.random.key(config.seed + 1), (10, 10), jnp.float32))
    trained = np.abs(router.prob - init).max(axis=1) > 1e-3
    assert trained[1:5].any() and not trained[0] and not trained[5:].any()
    # heat map: the 4 cache rows x 10 sub-layers, upscaled 8x
    with Image.open(os.path.join(workdir, "router_heatmap.png")) as im:
        assert im.size == (80, 32)


def test_uvit_router_training_refuses_other_solvers(tiny_setup, tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.training.trainer import train_router

    for extra, msg in [(["--config.sampler.name=dpm_solver3"], "dpm_solver2"),
                       (["--config.sampler.steps=7"], "even number >= 4")]:
        config, workdir = parse_config_flags(uvit_args(tiny_setup, tmp_path / "x", 1, extra))
        with pytest.raises(ConfigError, match=msg):
            train_router(config, workdir, report=lambda *_: None)
