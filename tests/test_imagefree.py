"""Routers without a dataset (the model's own trajectories) and for other step counts (retargeting)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, fixture_path, nhwc, reference_io, reference_model, rel_err
from l2c_jax.cli import parse_config_flags
from l2c_jax.errors import ConfigError
from l2c_jax.retarget import retarget, row_times
from l2c_jax.router import Router, load_router

QUIET = dict(report=lambda *_: None)


def _config(variant, *flags):
    config, _ = parse_config_flags(["--config", f"configs/{variant}", *flags])
    return config


def _smoke_trajectories(tmp_path, n=6, batch=4, name="t"):
    from l2c_jax.model import model_from_config
    from l2c_jax.training.trajectories import record_trajectories

    config = _config("router_dit.py:smoke_imagefree", f"--config.data.num_trajectories={n}",
                     f"--config.data.trajectory_batch_size={batch}")
    model = model_from_config(config.model)
    return config, model, record_trajectories(config, str(tmp_path / name), model, **QUIET)


@pytest.mark.slow
def test_recorded_trajectories_are_the_full_samplers_states(tmp_path):
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.sampling.draws import draw_labels, sample_noise
    from l2c_jax.training.trajectories import TrajectorySource

    config, model, directory = _smoke_trajectories(tmp_path)  # 6 trajectories in batches of 4: one padded
    src = TrajectorySource(directory)
    cfg = model.config
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    assert src.states.shape == (6, 10) + shape and len(src) == 6
    np.testing.assert_array_equal(src.states[:, 0], sample_noise(0, np.arange(6), shape))
    np.testing.assert_array_equal(src.labels, draw_labels(0, np.arange(6), cfg.null_class))
    # Each state is one full DDIM step of the model from the one before: what the loss's full step takes.
    diffusion = create_diffusion("10", learn_sigma=cfg.learn_sigma)
    y = jnp.asarray(src.labels, jnp.int32)
    for s in range(9):
        i = 9 - s
        x = jnp.asarray(src.states[:, s])
        out, _ = model.apply(model.params, x, jnp.full((6,), diffusion.timestep_map[i]), y)
        assert rel_err(diffusion.ddim_step(out, x, i), src.states[:, s + 1]) < 1e-4
    x, label = src.load(3)
    assert x.shape == (10,) + shape and label == int(src.labels[3])


def test_an_interrupted_recording_resumes_and_a_changed_one_is_refused(tmp_path, monkeypatch):
    import l2c_jax.training.trajectories as traj

    _, _, whole = _smoke_trajectories(tmp_path, name="whole")
    calls = {"n": 0}
    real = traj.sample_noise

    def dies_on_the_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(traj, "sample_noise", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _smoke_trajectories(tmp_path, name="cut")
    assert not os.path.exists(tmp_path / "cut" / "trajectories.json")
    monkeypatch.setattr(traj, "sample_noise", real)
    lines = []
    config, model, cut = _smoke_trajectories(tmp_path, name="cut")
    np.testing.assert_array_equal(np.load(os.path.join(cut, "states.npy")),
                                  np.load(os.path.join(whole, "states.npy")))
    assert sorted(os.listdir(cut)) == ["labels.npy", "states.npy", "trajectories.json"]
    config.data.num_trajectories = 5
    with pytest.raises(ConfigError, match=r"recorded otherwise \(count: 6 -> 5\)"):
        traj.record_trajectories(config, cut, model, report=lines.append)
    config.data.tfds_name = "sklearn_digits"
    with pytest.raises(ConfigError, match="trains without images, but data.tfds_name is set"):
        traj.trajectories_dir(config, str(tmp_path))


def _dit_batch():
    io = reference_io("dit")
    return dict(x0=jnp.asarray(nhwc(io["train_x0"])), y=jnp.asarray(io["train_y"]),
                noise=jnp.asarray(nhwc(io["train_noise"])))


@pytest.mark.parametrize("period,forecast,t_index", [(2, "copy", 7), (3, "taylor2", 6)])
def test_the_dit_loss_from_states_is_the_loss_from_noised_images(period, forecast, t_index):
    """Fed the very states q_sample would give, the image-free loss is the image loss: the indexing is right."""
    from l2c_jax.diffusion import create_diffusion
    from l2c_jax.training.losses import dit_router_loss

    model, diffusion, b = reference_model("dit"), create_diffusion("10"), _dit_batch()
    states = jnp.stack([diffusion.q_sample(b["x0"], 9 - s, b["noise"]) for s in range(10)], 1)
    free = dict(x0=jnp.zeros_like(b["x0"]), y=b["y"], noise=jnp.zeros_like(b["noise"]), states=states)
    prob = jnp.asarray(np.random.default_rng(0).normal(size=(10, model.num_units)), jnp.float32)

    def loss(p, batch):
        return dit_router_loss(p, model.params, dict(batch, t_index=jnp.int32(t_index)), model=model,
                               diffusion=diffusion, l1_weight=1e-3, period=period, forecast=forecast)

    (want, _), g_want = jax.value_and_grad(loss, has_aux=True)(prob, b)
    (got, _), g_got = jax.value_and_grad(loss, has_aux=True)(prob, free)
    assert rel_err(got, want) < 1e-6 and rel_err(g_got, g_want) < 1e-5 and np.abs(np.asarray(g_got)).max() > 0


@pytest.mark.slow
def test_the_uvit_loss_from_states_is_the_loss_from_noised_images():
    from l2c_jax.training.losses import UViTLossSchedule, uvit_router_loss

    model, io = reference_model("uvit"), reference_io("uvit")
    tables = UViTLossSchedule.create(int(io["dpm_nfe"]))
    x0, eps = jnp.asarray(nhwc(io["train_x0"])), jnp.asarray(nhwc(io["train_eps"]))
    states = jnp.stack([tables.sqrt_ac[k] * x0 + tables.sqrt_1m_ac[k] * eps for k in range(tables.num_steps)], 1)
    k = jnp.int32(int(io["train_step"]))
    b = dict(x0=x0, y=jnp.asarray(io["train_y"]), eps=eps, step=k)
    free = dict(b, x0=jnp.zeros_like(x0), eps=jnp.zeros_like(eps), states=states)
    prob = jnp.asarray(load_router(fixture_path("uvit", "uvit_tiny_router_dpm10.pth")).prob)

    def loss(p, batch):
        return uvit_router_loss(p, model.params, batch, model=model, tables=tables, l1_weight=0.1)

    (want, _), g_want = jax.value_and_grad(loss, has_aux=True)(prob, b)
    (got, _), g_got = jax.value_and_grad(loss, has_aux=True)(prob, free)
    assert rel_err(got, want) < 1e-6 and rel_err(g_got, g_want) < 1e-5
    # The time axis retargeting interpolates over is the one the loss gives the model.
    np.testing.assert_array_equal(row_times("uvit-dpm2", tables.num_steps * 2)[:tables.num_steps],
                                  tables.timesteps[:-1])


@pytest.mark.slow
def test_image_free_training_runs_end_to_end_and_reuses_its_trajectories(tmp_path):
    # The U-ViT route as users run it: the script, from nothing downloaded; beside the digits run below
    # (each is mostly single-threaded start-up and compilation on this 2-core CPU).
    cmd = [sys.executable, "scripts/train_router.py", "--config", "configs/router_uvit.py:smoke_imagefree",
           "--workdir", str(tmp_path / "u"), "--config.train.steps=4", "--config.train.log_every=2"]
    uvit = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # docs/imagefree_routers.md's digits command as written (tests/docs_blocks.py), short.
        from docs_blocks import run_block
        r = run_block("imagefree", tmp_path, append="--config.train.steps=6 --config.train.batch_size=8 "
                      "--config.train.log_every=3 --config.train.checkpoint_every=6 --config.data.num_trajectories=8 "
                      "--config.data.trajectory_batch_size=8")
        out, err = uvit.communicate(timeout=600)
    finally:
        if uvit.poll() is None:
            uvit.kill()
            uvit.wait()
    assert "recording 8 trajectories" in r.stdout and "no images" not in r.stderr
    router = load_router(str(tmp_path / "runs" / "free20" / "router.safetensors"))
    assert router.steps == 20 and np.isfinite(router.prob).all()
    assert os.path.isfile(tmp_path / "runs" / "free20" / "trajectories" / "trajectories.json")
    assert uvit.returncode == 0, err[-2000:]
    assert "recording 16 trajectories (5 states each" in out
    assert load_router(str(tmp_path / "u" / "router.safetensors")).kind == "uvit-dpm2"
    r = subprocess.run(cmd[:-2] + ["--config.train.steps=6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "using 16 trajectories" in r.stdout, r.stderr[-2000:]


def _linear_router(steps, period):
    """Cache rows linear in the diffusion time, with another line at each position of the period."""
    t = row_times("dit-ddim", steps)
    prob = np.zeros((steps, 6), np.float32)
    r = Router(prob, "dit-ddim", threshold=0.3, period=period, forecast="taylor1" if period > 2 else "copy")
    for s in r.cache_steps():
        row, pos = steps - 1 - s, s % period
        prob[row] = (np.arange(6) - 2.5) * (t[row] / 1000.0) * pos + pos
    r.prob = prob
    return r


@pytest.mark.parametrize("period", [2, 3])
def test_retargeting_interpolates_each_unit_over_diffusion_time(period):
    src, want = _linear_router(50, period), _linear_router(20, period)
    got = retarget(src, 20)
    assert (got.steps, got.period, got.forecast, got.threshold) == (20, period, src.forecast, 0.3)
    t_src, t_dst = row_times("dit-ddim", 50), row_times("dit-ddim", 20)
    for s in got.cache_steps():
        row = 19 - s
        ok = [t_src[49 - q] for q in src.cache_steps() if q % period == s % period]
        if min(ok) <= t_dst[row] <= max(ok):  # inside the source's span: the line itself
            np.testing.assert_allclose(got.prob[row], want.prob[row], atol=1e-5)
    assert retarget(src, 50) is src
    with pytest.raises(ConfigError, match="even step count"):
        retarget(_linear_router(50, 2), 21)


def test_the_released_ddim50_router_retargets_close_to_the_released_ddim20():
    """On the released DiT-XL/2 routers: 50 -> 20 agrees with the one trained for 20 on 98% of the masks."""
    r50, r20 = load_router(fixture_path("routers", "DDIM50_router.pt")), load_router(
        fixture_path("routers", "DDIM20_router.pt"))
    got = retarget(r50, 20)
    cs = r20.cache_steps()
    assert (got.masks(0.1)[cs] == r20.masks(0.1)[cs]).mean() > 0.97
    assert abs(got.removed_ratio(0.1) - r20.removed_ratio(0.1)) < 1.0  # percent of the cache steps' sub-layers


def test_sampling_and_conversion_retarget_only_when_asked(tmp_path):
    from l2c_jax.pipelines import run_sampling
    from l2c_jax.resources import asset

    r50 = asset("digits", "router_ddim50.safetensors")
    flags = [f"--config.router.checkpoint={r50}", "--config.num_samples=4", "--config.batch_size=4",
             "--config.repeats=0"]
    with pytest.raises(ConfigError, match="trained for 50 steps, sampling uses 20 .*retarget"):
        run_sampling(_config("dit_sample.py:digits_ddim20_l2c", *flags), str(tmp_path / "a"), **QUIET)
    result = run_sampling(_config("dit_sample.py:digits_ddim20_l2c", *flags, "--config.router.retarget=True"),
                          str(tmp_path / "b"), **QUIET)
    assert result["computed_share"] == pytest.approx(retarget(load_router(r50), 20).masks(0.5).mean())
    out = tmp_path / "r20.safetensors"
    r = subprocess.run([sys.executable, "convert/router.py", "--checkpoint", r50, "--steps", "20", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(load_router(str(out)).prob, retarget(load_router(r50), 20).prob)
