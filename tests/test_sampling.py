"""DiT sampling with and without the learned cache against the original's DDIM runs."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, ROOT, fixture_path
from l2c_jax import ConfigError
from l2c_jax.convert.dit import convert_dit
from l2c_jax.sampling import DiTSampler, sample


FAMILY = "dit"  # the reference fixtures behind io / model / router (conftest)


def test_ddim_full_matches_original(model, io):
    # The fixture batch is [2 cond | 2 uncond] of the same noise; we pass the cond half.
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    out = sample(model, noise, io["ddim_y"][:2], solver="ddim", steps=int(io["ddim_steps"]), cfg_scale=4.0)
    assert rel_err(out, io["ddim_full"].transpose(0, 2, 3, 1)[:2]) < 1e-4


def test_ddim_l2c_matches_original(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    out = sample(model, noise, io["ddim_y"][:2], solver="ddim", steps=10, cfg_scale=4.0,
                 router=router, threshold=float(io["l2c_threshold"]))
    ref = io["ddim_l2c"].transpose(0, 2, 3, 1)[:2]
    assert rel_err(out, ref) < 1e-4
    # and the cache made a difference the original also saw
    assert rel_err(io["ddim_full"][:2], io["ddim_l2c"][:2]) > 1e-4


def test_router_masks_and_timestep_map(router, io):
    np.testing.assert_array_equal(router.masks(float(io["l2c_threshold"])), io["l2c_masks"])
    s = DiTSampler(convert_dit(fixture_path("dit", "dit_tiny.pt"), num_heads=4), 10)
    np.testing.assert_array_equal(s.diffusion.timestep_map, io["timestep_map"])


def test_each_distinct_mask_compiles_once(model, router, io):
    s = DiTSampler(model, 10, cfg_scale=4.0)
    masks = router.masks(0.5)
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    s(noise, io["ddim_y"][:2], masks)
    n = len(s._compiled)
    distinct = {tuple(m) for m in masks if not all(m)}
    assert n <= len(distinct) + 2  # + the full step with and without keeping the cache
    s(noise, io["ddim_y"][:2], masks)
    assert len(s._compiled) == n


def test_deterministic_given_noise(model, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    a = sample(model, noise, io["ddim_y"][:2], steps=4, cfg_scale=4.0)
    b = sample(model, noise, io["ddim_y"][:2], steps=4, cfg_scale=4.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ddpm_is_the_posterior_chain_with_per_image_draws(model, io):
    """DDPM is the original's p_sample chain (`ddpm_step`, tested against it in test_diffusion) over the
    model's outputs, with each image's noise drawn from its own key: an image's result does not depend
    on the batch it is sampled in, and the noise matters at every step but the last."""
    import jax
    from l2c_jax.sampling.dit import _per_sample_normal
    noise = jnp.asarray(io["ddim_noise"].transpose(0, 2, 3, 1)[:2])
    y = jnp.asarray(io["ddim_y"][:2])
    with pytest.raises(ConfigError, match="PRNG key"):
        sample(model, noise, y, solver="ddpm", steps=4)
    keys = jax.random.split(jax.random.key(0), 2)
    s = DiTSampler(model, 4, solver="ddpm")
    out = np.asarray(s(noise, y, key=keys))
    x = noise
    for step, i in enumerate(s.diffusion.sampling_indices()):
        t = jnp.broadcast_to(s.diffusion.model_timesteps(i), (2,))
        o, _ = model.apply(model.params, x, t, y)
        x = s.diffusion.ddpm_step(o, x, i, _per_sample_normal(keys, jnp.int32(step), x.shape[1:]))
    assert rel_err(out, x) < 1e-5
    alone = np.asarray(s(noise[1:], y[1:], key=keys[1:]))
    assert rel_err(alone[0], out[1]) < 1e-5
    other = np.asarray(s(noise, y, key=jax.random.split(jax.random.key(1), 2)))
    ddim = np.asarray(sample(model, noise, y, steps=4))
    assert rel_err(other, out) > 1e-2 and rel_err(ddim, out) > 1e-2


def test_bad_inputs_are_clear_errors(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    with pytest.raises(ConfigError, match="trained for 10 steps"):
        sample(model, noise, io["ddim_y"][:2], steps=20, router=router, threshold=0.5)
    with pytest.raises(ConfigError, match="threshold"):
        sample(model, noise, io["ddim_y"][:2], steps=10, router=router)
    with pytest.raises(ConfigError, match="labels must lie"):
        sample(model, noise, np.array([3, 11]), steps=2)
    with pytest.raises(ConfigError, match="noise has shape"):
        sample(model, noise[:, :4], io["ddim_y"][:2], steps=2)


@pytest.mark.slow
def test_sample_script_end_to_end_with_tiny_dit_and_vae(tmp_path):
    """Converted tiny DiT + tiny VAE + router -> PNG grid and npz."""
    dit_dir, vae_dir = tmp_path / "dit", tmp_path / "vae"
    py = sys.executable
    r = subprocess.run([py, "convert/dit.py", "--checkpoint", fixture_path("dit", "dit_tiny.pt"), "--num-heads", "4",
                        "--out", str(dit_dir)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([py, "convert/vae.py", "--checkpoint", fixture_path("vae", "vae_tiny_diffusers.safetensors"),
                        "--out", str(vae_dir)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"
    r = subprocess.run([py, "scripts/sample.py", "--config", "configs/dit_sample.py:smoke",
                        f"--config.model.checkpoint={dit_dir}", "--config.model.random_init=False",
                        f"--config.vae.checkpoint={vae_dir}",
                        f"--config.router.checkpoint={fixture_path('dit', 'dit_tiny_router_ddim10.pt')}",
                        "--config.router.threshold=0.5", "--config.sampler.steps=10",
                        "--config.labels=(1,2,3)", "--config.batch_size=2", "--config.repeats=1",
                        "--config.npz=samples.npz", "--workdir", str(work)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sub-layers computed" in r.stdout and "per batch" in r.stdout
    from PIL import Image
    img = Image.open(work / "samples.png")
    assert img.size[0] > 16
    arr = np.load(work / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 16, 16, 3)


@pytest.mark.slow
def test_sample_script_refuses_router_for_other_steps(tmp_path):
    dit_dir = tmp_path / "dit"
    subprocess.run([sys.executable, "convert/dit.py", "--checkpoint", fixture_path("dit", "dit_tiny.pt"),
                    "--num-heads", "4", "--out", str(dit_dir)], cwd=ROOT, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "scripts/sample.py", "--config", "configs/dit_sample.py:smoke",
                        f"--config.model.checkpoint={dit_dir}", "--config.model.random_init=False",
                        f"--config.router.checkpoint={fixture_path('dit', 'dit_tiny_router_ddim10.pt')}",
                        "--config.sampler.steps=20", "--workdir", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "10 steps" in r.stderr
