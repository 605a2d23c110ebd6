"""DiT checkpoints in the diffusers format: converted, they match diffusers' forward (its numerics) and,
with `--timestep-shift original`, the original code's (the reference fixture)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import fixture_path, nhwc, rel_err
from l2c_jax import ConfigError, load_model, load_vae
from l2c_jax.cli import run_main
from l2c_jax.commands import convert_dit as convert_cli

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[tests]'")

FAMILY = "dit"


def _convert(capsys, *args):
    with pytest.raises(SystemExit) as e:
        run_main(convert_cli.main, list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _tiny_transformer(seed=0, same_embedders=True):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in m.parameters():  # every weight nonzero (no adaLN-Zero zeros), at about a trained DiT's scale
            p.copy_(torch.randn_like(p) * 0.1)
        if same_embedders:  # the original DiT has one embedder; diffusers' conversion copies it into every block
            e0 = m.transformer_blocks[0].norm1.emb.state_dict()
            for blk in m.transformer_blocks[1:]:
                blk.norm1.emb.load_state_dict(e0)
    return m


def _inputs():
    g = np.random.default_rng(0)
    x = g.standard_normal((3, 4, 8, 8)).astype(np.float32)
    return x, np.array([0, 417, 999]), np.array([1, 9, 10])  # 10 = the null class


def _diffusers_forward(m, x, t, y):
    with torch.no_grad():
        return m(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()


@pytest.mark.slow
def test_transformer_folder_matches_diffusers(tmp_path, capsys):
    m = _tiny_transformer()
    m.save_pretrained(tmp_path / "transformer")
    code, out, err = _convert(capsys, "--checkpoint", str(tmp_path / "transformer"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "diffusers' numerics" in out
    model = load_model(str(tmp_path / "o"))
    assert model.config.freq_shift == 1 and model.config.mlp_norm_eps == pytest.approx(1e-5)
    x, t, y = _inputs()
    ref = _diffusers_forward(m, x, t, y)
    got, _ = model(nhwc(x), jnp.asarray(t), jnp.asarray(y))
    assert rel_err(got, nhwc(ref)) < 1e-5
    # the original's numerics are measurably different on the same weights
    code, _, err = _convert(capsys, "--checkpoint", str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"),
                            "--timestep-shift", "original", "--out", str(tmp_path / "orig"))
    assert code == 0, err
    other, _ = load_model(str(tmp_path / "orig"))(nhwc(x), jnp.asarray(t), jnp.asarray(y))
    assert rel_err(other, nhwc(ref)) > 1e-4


def test_original_fixture_through_diffusers_format_matches_original(io, tmp_path, capsys):
    code, _, err = _convert(capsys, "--checkpoint", fixture_path("dit", "dit_tiny.pt"), "--num-heads", "4",
                            "--out", str(tmp_path / "orig"))
    assert code == 0, err
    code, out, err = _convert(capsys, "--export-diffusers", str(tmp_path / "orig"), "--out", str(tmp_path / "hf"))
    assert code == 0 and "timestep embedding" in out, err
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["_class_name"] == "DiTTransformer2DModel" and cfg["num_layers"] == 4
    code, out, err = _convert(capsys, "--checkpoint", str(tmp_path / "hf"), "--timestep-shift", "original",
                              "--out", str(tmp_path / "back"))
    assert code == 0 and "original's numerics" in out, err
    model = load_model(str(tmp_path / "back"))
    out_, _ = model(nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(np.asarray(out_), nhwc(io["forward"]), atol=1e-5, rtol=0)
    # and diffusers itself loads the exported folder
    hf = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.num_layers == 4


def _pipeline(tmp_path, beta_end=0.02):
    root = tmp_path / "pipe"
    _tiny_transformer().save_pretrained(root / "transformer")
    torch.manual_seed(1)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                            latent_channels=4, norm_num_groups=32, layers_per_block=1).save_pretrained(root / "vae")
    diffusers.DDIMScheduler(beta_start=0.0001, beta_end=beta_end, beta_schedule="linear").save_pretrained(
        root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return root


def test_pipeline_folder_converts_model_and_vae(tmp_path, capsys):
    root = _pipeline(tmp_path)
    code, out, err = _convert(capsys, "--checkpoint", str(root), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert load_model(str(tmp_path / "o")).config.depth == 3
    vae = load_vae(str(tmp_path / "o" / "vae"))
    assert vae.decode(jnp.zeros((1, 4, 4, 4))).shape == (1, 8, 8, 3)


def test_other_schedule_and_differing_embedders_are_refused(tmp_path, capsys):
    root = _pipeline(tmp_path, beta_end=0.012)
    code, _, err = _convert(capsys, "--checkpoint", str(root), "--out", str(tmp_path / "o"))
    assert code != 0 and "beta_end" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")  # nothing written
    _tiny_transformer(same_embedders=False).save_pretrained(tmp_path / "t")
    code, _, err = _convert(capsys, "--checkpoint", str(tmp_path / "t"), "--out", str(tmp_path / "o2"))
    assert code != 0 and "block 1" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="timestep-shift diffusers"):
        from l2c_jax.convert.dit import convert_dit
        convert_dit(fixture_path("dit", "dit_tiny.pt"), num_heads=4, timestep_shift="diffusers")
