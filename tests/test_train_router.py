"""Router training: the original's loss, a short run, resume after SIGKILL, several devices."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, fixture_path
from l2c_jax.convert.dit import convert_dit
from l2c_jax.diffusion import create_diffusion
from l2c_jax.router import load_router
from l2c_jax.training.losses import dit_router_loss


def test_dit_loss_and_gradient_match_the_original():
    io = dict(np.load(fixture_path("dit", "dit_tiny_io.npz")))
    model = convert_dit(fixture_path("dit", "dit_tiny.pt"), num_heads=4)
    router = load_router(fixture_path("dit", "dit_tiny_router_ddim10.pt"))
    y = np.where(io["train_drop_u"] < 0.1, model.config.null_class, io["train_y"])
    batch = dict(x0=jnp.asarray(io["train_x0"].transpose(0, 2, 3, 1)), y=jnp.asarray(y),
                 noise=jnp.asarray(io["train_noise"].transpose(0, 2, 3, 1)),
                 t_index=jnp.int32(io["train_t_index"][0]))
    fn = lambda p: dit_router_loss(p, model.params, batch, model=model, diffusion=create_diffusion("10"),  # noqa
                                   l1_weight=float(io["train_l1_weight"]))
    (loss, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(router.prob))
    rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())  # noqa
    assert rel(aux["mse"], io["train_mse"]) < 1e-4
    assert rel(aux["l1"], io["train_l1"]) < 1e-6
    assert rel(loss, io["train_loss"]) < 1e-4
    assert rel(grad, io["train_router_grad"]) < 1e-4
    # only the row of the cache step receives gradient
    t = int(io["train_t_index"][0])
    assert np.all(np.asarray(grad)[np.arange(10) != t - 1] == 0)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """The fixture DiT and VAE converted, and a small generated image folder (16x16 -> 8x8 latents)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("train")
    for args, out in [(["convert/dit.py", "--checkpoint", fixture_path("dit", "dit_tiny.pt"), "--num-heads", "4"], "dit"),
                      (["convert/vae.py", "--checkpoint", fixture_path("vae", "vae_tiny_diffusers.safetensors")], "vae")]:
        r = subprocess.run([sys.executable, *args, "--out", str(root / out)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "images" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 255, (20 + i, 18, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def train_cmd(setup, workdir, steps=30, extra=()):
    return [sys.executable, "scripts/train_router.py", "--config", "configs/router_dit.py:smoke", "--workdir", str(workdir),
            "--config.model.random_init=False", f"--config.model.checkpoint={setup / 'dit'}",
            f"--config.vae.checkpoint={setup / 'vae'}", f"--config.data.image_folder={setup / 'images'}",
            f"--config.train.steps={steps}", "--config.train.lr=0.05", "--config.train.l1=0.01", *extra]


@pytest.mark.slow
def test_short_run_lowers_the_loss_and_writes_everything(tiny_setup, tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.training.trainer import train_router
    cmd = train_cmd(tiny_setup, tmp_path / "w")
    config, workdir = parse_config_flags(cmd[2:])
    out = train_router(config, workdir, report=lambda *_: None)
    hist = out["history"]
    assert len(hist) == 6 and hist[-1]["loss"] < hist[0]["loss"]
    assert all(0.0 <= h["computed_share"] <= 1.0 for h in hist)
    w = tmp_path / "w"
    assert (w / "config.json").exists() and (w / "router_heatmap.png").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(w))
    assert sorted(os.listdir(w / "checkpoints")) == ["10", "20", "30"]
    router = load_router(str(w))
    assert router.steps == 10 and router.num_units == 8 and router.kind == "dit-ddim"
    assert np.all(np.abs(router.prob) <= 5.0)


@pytest.mark.slow
def test_killed_run_resumes_where_its_checkpoint_was(tiny_setup, tmp_path):
    # The uninterrupted reference runs beside the run that is killed (both mostly single-threaded here).
    ref = subprocess.Popen(train_cmd(tiny_setup, tmp_path / "ref", steps=40), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    work = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(tiny_setup, work, steps=40), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (work / "checkpoints" / "10").exists():
            time.sleep(0.05)
        assert (work / "checkpoints" / "10").exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, err = ref.communicate(timeout=300)
        assert ref.returncode == 0, err[-2000:]
    finally:
        for p in (ref, proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    done = [int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()]
    assert not (work / "router.safetensors").exists() and max(done) < 40

    r = subprocess.run(train_cmd(tiny_setup, work, steps=40), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and f"at step {max(done)}" in r.stdout
    # the same batches and draws: identical to the uninterrupted run
    np.testing.assert_allclose(load_router(str(work)).prob, load_router(str(tmp_path / "ref")).prob, atol=1e-6)


@pytest.mark.slow
def test_four_devices_give_the_same_result_as_one(tiny_setup, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(train_cmd(tiny_setup, tmp_path / d, steps=10), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e)
             for d, e in (("d4", env), ("d1", None))]  # at once: each is mostly single-threaded here
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    p4, p1 = load_router(str(tmp_path / "d4")).prob, load_router(str(tmp_path / "d1")).prob
    np.testing.assert_allclose(p4, p1, atol=1e-5)
    # and the run really used 4 devices
    code = "import jax; print(jax.device_count())"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "4"


@pytest.mark.slow
def test_bad_configs_fail_cleanly(tiny_setup, tmp_path):
    r = subprocess.run(train_cmd(tiny_setup, tmp_path / "x", extra=["--config.sampler.steps=9"]), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "even" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run(train_cmd(tiny_setup, tmp_path / "y", extra=["--config.data.image_folder=/nonexistent"]),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a directory" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["train.steps=0", "train.batch_size=-2", "train.checkpoint_every=0",
                                  "train.log_every=0", "train.lr=nan", "train.lr=0", "train.l1=-1", "train.l1=inf",
                                  "train.lr=-1"])
def test_bad_training_knobs_are_refused_before_any_work(flag, tmp_path):
    # 0 steps wrote an untrained router; a negative batch or checkpoint_every=0 failed late with a NumPy error
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.errors import ConfigError
    from l2c_jax.training.trainer import train_router
    config, workdir = parse_config_flags(["--config", "configs/router_dit.py:smoke", "--workdir",
                                          str(tmp_path / "w"), f"--config.{flag}"])
    with pytest.raises(ConfigError, match=flag.split("=")[0].replace(".", r"\.")):
        train_router(config, workdir, report=lambda *_: None)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.training import trainer
    from l2c_jax.training.trainer import TrainingDiverged, train_router
    # a NaN learning rate is refused at config time now; let it through here to make the run diverge
    monkeypatch.setattr(trainer, "check_train_config", lambda tc: None)
    # and a resume with another rate is refused too (the config check of training_workdir): allow it here
    from l2c_jax.training import loop
    monkeypatch.setattr(loop, "RESUMABLE", loop.RESUMABLE + ("train.lr",))
    config, workdir = parse_config_flags(train_cmd(tiny_setup, tmp_path / "nan", steps=10)[2:])
    train_router(config, workdir, report=lambda *_: None)
    with config.unlocked():
        config.train.steps = 20
        config.train.lr = float("nan")
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train_router(config, workdir, report=lambda *_: None)
    assert sorted(os.listdir(tmp_path / "nan" / "checkpoints")) == ["10"]


@pytest.mark.slow
def test_precomputed_latents_train_like_images(tiny_setup, tmp_path):
    lat = tmp_path / "lat"
    r = subprocess.run([sys.executable, "scripts/extract_latents.py", "--config", "configs/router_dit.py:smoke",
                        "--workdir", str(lat), f"--config.vae.checkpoint={tiny_setup / 'vae'}",
                        f"--config.data.image_folder={tiny_setup / 'images'}", "--config.data.flip=True"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    m = np.load(lat / "moments.npy")
    assert m.shape == (48, 8, 8, 8) and np.load(lat / "labels.npy").shape == (48,)
    r = subprocess.run(train_cmd(tiny_setup, tmp_path / "w", steps=10, extra=[f"--config.data.latents={lat}"]),
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_router(str(tmp_path / "w")).steps == 10
