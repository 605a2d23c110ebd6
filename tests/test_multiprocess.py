"""Jobs over several processes (jax.distributed on localhost, two processes of two CPU devices each).

(a) sampling, killed mid-way and rerun, gives the images of a one-process run, index for index;
(b) router training gives the router of a one-process run with the same global batch;
(c) image-free router training records its trajectories over both processes and trains as one;
(d) latent extraction over two processes writes the one-process files.
"""

import os
import time

import numpy as np
import pytest

from multiprocess import job

N = 600  # digits at DDIM 20: a few seconds of sampling, long enough to kill a job mid-way
SAMPLE = ["--config", "configs/dit_sample.py:digits_ddim20_l2c", f"--config.num_samples={N}",
          "--config.batch_size=4", "--config.compilation_cache_dir=off"]


def _images(workdir):
    return np.load(os.path.join(str(workdir), "samples.npz"))["arr_0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with two devices, the same per-device batch as each process below."""
    work = tmp_path_factory.mktemp("one_process")
    with job("sample", SAMPLE + ["--workdir", str(work)], processes=1, devices=2, logdir=work) as j:
        j.check(300)
    return _images(work)


@pytest.mark.slow
def test_another_per_device_batch_gives_the_same_images(one_process, tmp_path):
    """8 on one device, in this process: the same images up to CPU kernel rounding."""
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.pipelines import run_sampling

    config, _ = parse_config_flags(SAMPLE[:3] + ["--config.batch_size=8"])
    run_sampling(config, str(tmp_path / "batch8"), report=lambda *_: None)
    diff = np.abs(_images(tmp_path / "batch8").astype(int) - one_process.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def _train_on_one_and_two_processes(args, tmp_path):
    """train_router into tmp_path/one (one process, four devices) and tmp_path/two (two processes of two):
    the same global batch either way. The two jobs run at once (each is mostly single-threaded start-up and
    compilation on this 2-core CPU). Returns the two processes' outputs."""
    with job("train_router", args + ["--workdir", str(tmp_path / "one")], processes=1, devices=4,
             logdir=tmp_path) as one, job("train_router", args + ["--workdir", str(tmp_path / "two")],
                                          logdir=tmp_path) as two:
        two.check(300)
        one.check(300)
        return two.output(0), two.output(1)


@pytest.mark.slow
def test_router_training_over_two_processes_gives_the_one_process_router(tmp_path):
    from l2c_jax.router import load_router

    args = ["--config", "configs/router_digits.py:20", "--config.train.steps=4", "--config.train.batch_size=16",
            "--config.train.log_every=2", "--config.train.checkpoint_every=2"]
    _train_on_one_and_two_processes(args, tmp_path)
    one = load_router(str(tmp_path / "one" / "router.safetensors")).prob
    two = load_router(str(tmp_path / "two" / "router.safetensors")).prob
    assert np.abs(two - one).max() < 1e-5  # the cross-process reduction sums in another order: ~1e-6
    # The steps moved the router from its start (config.seed + 1), so other images would have given another.
    import jax
    start = np.asarray(jax.random.normal(jax.random.key(1), one.shape))
    assert np.abs(one - start).max() > 1e-2
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_image_free_training_over_two_processes_records_and_trains_as_one(tmp_path):
    """Each process records every other batch of trajectories into the shared files, then trains on them."""
    from l2c_jax.router import load_router

    args = ["--config", "configs/router_digits.py:20_imagefree", "--config.data.num_trajectories=48",
            "--config.data.trajectory_batch_size=16", "--config.train.steps=4", "--config.train.batch_size=16",
            "--config.train.log_every=2", "--config.train.checkpoint_every=4"]
    two = _train_on_one_and_two_processes(args, tmp_path)
    assert "recorded 48 trajectories" in two[0] and "recorded" not in two[1]
    states = [np.load(str(tmp_path / w / "trajectories" / "states.npy")) for w in ("one", "two")]
    assert states[0].shape == (48, 20, 8, 8, 1)
    np.testing.assert_allclose(states[1], states[0], rtol=0, atol=1e-5)  # per-device batches 4 vs 8: rounding
    one = load_router(str(tmp_path / "one" / "router.safetensors")).prob
    two = load_router(str(tmp_path / "two" / "router.safetensors")).prob
    assert np.abs(two - one).max() < 1e-4


@pytest.mark.slow
def test_sampling_over_two_processes_killed_and_resumed_gives_the_one_process_images(one_process, tmp_path):
    """Two processes, SIGKILLed mid-way, then rerun: the npz of one uninterrupted process, index for index
    (the rerun samples the other ~85% over both processes)."""
    shards = tmp_path / "shards"
    with job("sample", SAMPLE + ["--workdir", str(tmp_path)], logdir=tmp_path) as j:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(shards.glob("shard-*.npz"))) < 10:
            assert all(p.poll() is None for p in j.procs), j.output(0)[-3000:]
            time.sleep(0.02)
        j.kill()  # SIGKILL to both process groups, mid-way through the job
    written = len(list(shards.glob("shard-*.npz")))
    assert 10 <= written < N // 4 and not (tmp_path / "samples.npz").exists()

    with job("sample", SAMPLE + ["--workdir", str(tmp_path)], logdir=tmp_path) as j:
        j.check(300)
        out = j.output(0)
        assert f"sampled {N} images on 2 processes" in out
        assert "sampled" not in j.output(1)  # summaries print on process 0 only
    done = int(out.split("resuming: ")[1].split(" of ")[0])
    assert 40 <= done < N
    images = _images(tmp_path)
    assert images.shape == (N, 8, 8, 1) and images.std() > 10
    np.testing.assert_array_equal(images, one_process)
    assert not shards.exists()  # the job's scratch is gone once the npz is written


@pytest.mark.slow
def test_latent_extraction_over_two_processes_writes_the_one_process_files(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from conftest import ROOT, fixture_path

    r = subprocess.run([sys.executable, "convert/vae.py", "--checkpoint",
                        fixture_path("vae", "vae_tiny_diffusers.safetensors"), "--out", str(tmp_path / "vae")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rng = np.random.default_rng(0)
    for c in range(2):  # 2 x 40 images: three batches of 32, dealt to two processes
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{c}" / f"{i}.png")
    args = ["--config", "configs/router_dit.py:smoke", f"--config.vae.checkpoint={tmp_path / 'vae'}",
            f"--config.data.image_folder={tmp_path / 'images'}", "--config.data.flip=True"]
    with job("extract_latents", args + ["--workdir", str(tmp_path / "one")], processes=1, devices=1,
             logdir=tmp_path) as j:
        j.check(300)
    with job("extract_latents", args + ["--workdir", str(tmp_path / "two")], logdir=tmp_path) as j:
        j.check(300)
    for name in ("moments.npy", "labels.npy"):
        one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        assert one.shape == two.shape and one.shape[0] == 160
        np.testing.assert_allclose(two, one, atol=1e-6)
    assert np.abs(np.load(tmp_path / "one" / "moments.npy")).sum() > 0
