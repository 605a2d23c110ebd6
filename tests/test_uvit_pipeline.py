"""scripts/sample.py with a U-ViT: DPM-Solver-2, CFG, the released-format router, the LDM VAE, PNG + npz."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_path
from l2c_jax.errors import ConfigError


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture U-ViTs (class-conditional, and the unconditional conv variant) and the LDM-named tiny VAE."""
    from l2c_jax.convert.uvit import convert_uvit
    from l2c_jax.convert.vae import convert_vae

    root = tmp_path_factory.mktemp("uvit_pipeline")
    convert_uvit(fixture_path("uvit", "uvit_tiny.pth"), num_heads=4).save(str(root / "uvit"))
    convert_uvit(fixture_path("uvit", "uvit_tiny_conv.pth"), num_heads=4).save(str(root / "uvit_conv"))
    vae, naming, _ = convert_vae(fixture_path("vae", "vae_tiny_ldm.pth"))
    assert naming == "ldm"
    vae.save(str(root / "vae"))
    return root


def overrides(root, extra=()):
    return [f"--config.model.checkpoint={root / 'uvit'}", f"--config.vae.checkpoint={root / 'vae'}",
            f"--config.router.checkpoint={fixture_path('uvit', 'uvit_tiny_router_dpm10.pth')}",
            "--config.router.threshold=0.5", "--config.sampler.steps=10", *extra]


@pytest.mark.slow
def test_sample_script_end_to_end_with_tiny_uvit_router_and_ldm_vae(converted, tmp_path):
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, "scripts/sample.py", "--config", "configs/uvit_sample.py:h2_256_nfe20_l2c",
                        *overrides(converted), "--config.labels=(1,2,3)", "--config.batch_size=2",
                        "--config.repeats=1", "--config.npz=samples.npz", "--workdir", str(work)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NFE 10 DPM_SOLVER2 (5 steps) + L2C" in r.stdout and "per batch" in r.stdout
    # The router's masks (the fixture's) cache sub-layers only at the first evaluation of steps 1..4.
    masks = np.load(fixture_path("uvit", "uvit_tiny_io.npz"))["l2c_masks"]
    share = 1.0 - (~masks).sum() / (10 * 10)
    assert f"sub-layers computed: {share * 100:.2f}% of 10 evaluations x 10" in r.stdout
    from PIL import Image
    with Image.open(work / "samples.png") as img:
        assert img.size[0] > 16
    arr = np.load(work / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 16, 16, 3)  # 8x8x4 latents, VAE factor 2

    # The first batch is the VAE decode (latents / 0.18215) of UViTSampler's latents from images 0 and 1's noise.
    from l2c_jax import images as imio
    from l2c_jax.model import load_model
    from l2c_jax.router import load_router
    from l2c_jax.sampling.uvit import UViTSampler
    from l2c_jax.vae import load_vae

    model = load_model(str(converted / "uvit"))
    router = load_router(fixture_path("uvit", "uvit_tiny_router_dpm10.pth"))
    from l2c_jax.pipelines import sample_noise

    noise = sample_noise(0, [0, 1], (8, 8, 4))  # config.seed 0; image i's noise depends only on (seed, i)
    lat = UViTSampler(model, 10, cfg_scale=0.4)(noise, np.array([1, 2]), masks=router.masks(0.5))
    ref = imio.to_uint8(np.asarray(load_vae(str(converted / "vae")).decode(lat / 0.18215)))
    assert np.abs(arr[:2].astype(int) - ref.astype(int)).max() <= 1


def test_unconditional_uvit_samples_without_labels(converted, tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.pipelines import run_sampling

    config, _ = parse_config_flags(["--config", "configs/uvit_sample.py:h2_256_nfe20",
                                    f"--config.model.checkpoint={converted / 'uvit_conv'}",
                                    f"--config.vae.checkpoint={converted / 'vae'}", "--config.sampler.steps=4",
                                    "--config.sampler.cfg_scale=0.0", "--config.num_samples=3",
                                    "--config.batch_size=2", "--config.repeats=0", "--config.npz=s.npz"])
    out = run_sampling(config, str(tmp_path), report=lambda *_: None)
    assert out["num_images"] == 3 and out["computed_share"] == 1.0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 16, 16, 3)


def test_router_for_another_nfe_is_refused(converted, tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.pipelines import run_sampling

    config, _ = parse_config_flags(["--config", "configs/uvit_sample.py:h2_256_nfe20_l2c",
                                    *overrides(converted, ["--config.sampler.steps=20"])])
    with pytest.raises(ConfigError, match="10 steps, sampling uses 20"):
        run_sampling(config, str(tmp_path), report=lambda *_: None)
