"""KL autoencoder: parity with diffusers' AutoencoderKL and the LDM one, conversion, loading, refusals."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, fixture_path
from l2c_jax.checkpoint import write_model_dir
from l2c_jax.convert.vae import (DIFFUSERS, LDM, convert_vae, expected_keys, vae_params_from_state_dict,
                                 vae_state_dict)
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.vae import VAEConfig, init_vae_params
from l2c_jax.torch_io import load_checkpoint_file
from l2c_jax.vae import VAE, load_vae

TOL = 1e-5
DIFFUSERS_FILE = ("vae", "vae_tiny_diffusers.safetensors")
LDM_FILE = ("vae", "vae_tiny_ldm.pth")


def nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def io():
    d = np.load(fixture_path("vae", "vae_tiny_io.npz"))
    return {k: nhwc(d[k]) for k in d.files}


@pytest.fixture(scope="module")
def diffusers_vae():
    vae, naming, notes = convert_vae(fixture_path(*DIFFUSERS_FILE))
    assert naming == DIFFUSERS and notes == []
    return vae


@pytest.fixture(scope="module")
def ldm_vae():
    vae, naming, notes = convert_vae(fixture_path(*LDM_FILE))
    assert naming == LDM and notes == []
    return vae


def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max())
    assert err < TOL, err


def test_inferred_config(diffusers_vae, ldm_vae):
    want = VAEConfig(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                     embed_dim=4)
    assert diffusers_vae.config == want
    assert ldm_vae.config == want


def test_diffusers_parity(diffusers_vae, io):
    mean, logvar = diffusers_vae.encode(io["image"])
    close(mean, io["diffusers_mean"])
    close(logvar, io["diffusers_logvar"])
    close(diffusers_vae.decode(io["latent"]), io["diffusers_decoded"])


def test_ldm_parity(ldm_vae, io):
    moments = ldm_vae.apply_moments(ldm_vae.params, jnp.asarray(io["image"]))
    close(moments, io["ldm_moments"])
    mean, logvar = ldm_vae.encode(io["image"])
    close(mean, io["ldm_moments"][..., :4])
    close(logvar, np.clip(io["ldm_moments"][..., 4:], -30, 20))
    close(ldm_vae.decode(io["latent"]), io["ldm_decoded"])


def test_diffusers_bin_file(tmp_path, io):
    """diffusers' older `diffusion_pytorch_model.bin` is the same state dict, pickled by torch."""
    import torch

    sd = load_checkpoint_file(fixture_path(*DIFFUSERS_FILE))
    path = str(tmp_path / "diffusion_pytorch_model.bin")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    vae, naming, _ = convert_vae(path)
    assert naming == DIFFUSERS
    close(vae.decode(io["latent"]), io["diffusers_decoded"])


def test_chunked_decode_and_encode_match(ldm_vae, io):
    z = np.concatenate([io["latent"], io["latent"][::-1] * 0.5, io["latent"][:1]], 0)  # 5: last chunk padded
    full = ldm_vae.decode(z, chunk_size=None)
    np.testing.assert_allclose(ldm_vae.decode(z, chunk_size=2), full, atol=TOL, rtol=0)
    ldm_vae.chunk_size = 3
    try:
        np.testing.assert_allclose(ldm_vae.decode(z), full, atol=TOL, rtol=0)
        x = np.concatenate([io["image"]] * 2, 0)[:3]
        for a, b in zip(ldm_vae.encode(x), ldm_vae.encode(x, chunk_size=None)):
            np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
    finally:
        ldm_vae.chunk_size = 8


def test_sample_posterior(ldm_vae, io):
    mean, logvar = ldm_vae.encode(io["image"])
    key = jax.random.key(3)
    s = ldm_vae.sample_posterior(mean, logvar, key)
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    np.testing.assert_allclose(s, mean + np.exp(0.5 * np.asarray(logvar)) * eps, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(s, ldm_vae.sample_posterior(mean, logvar, key))
    assert not np.allclose(s, ldm_vae.sample_posterior(mean, logvar, jax.random.key(4)))


def test_wrong_layout_refused(ldm_vae, io):
    with pytest.raises(ConfigError, match="NHWC"):
        ldm_vae.encode(np.transpose(io["image"], (0, 3, 1, 2)))


def _ldm_training_ckpt(path):
    """The layout of an LDM autoencoder training checkpoint: `state_dict` with the loss's weights beside."""
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in load_checkpoint_file(fixture_path(*LDM_FILE)).items()}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["diffusers", "ldm_ckpt"])
def test_cli_round_trip(which, tmp_path, io, capsys):
    out = tmp_path / "vae"
    if which == "diffusers":
        # In-process (the same entry point, without a second JAX start-up).
        code, lines, err = _cli(["--checkpoint", fixture_path(*DIFFUSERS_FILE), "--out", str(out)], capsys)
        assert code == 0, err
    else:
        src = str(tmp_path / "autoencoder.ckpt")
        _ldm_training_ckpt(src)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "vae.py"), "--checkpoint", src,
                            "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
        lines, err = r.stdout.strip().splitlines(), r.stderr
        assert "ldm naming" in lines[0]
        assert "dropped 2 training-loss keys (loss.*)" in err, err
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}") and "ch 32 x [1, 2]" in lines[0], lines

    vae = load_vae(str(out), chunk_size=1)
    prefix = "diffusers" if which == "diffusers" else "ldm"
    close(vae.decode(io["latent"]), io[f"{prefix}_decoded"])
    if which == "diffusers":
        close(vae.encode(io["image"])[0], io["diffusers_mean"])


def test_load_vae_refuses_other_family(tmp_path):
    write_model_dir(str(tmp_path / "m"), "dit", {"depth": 1}, {"w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_vae(str(tmp_path / "m"))
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_vae(str(tmp_path / "absent"))


def _cli(argv, capsys):
    from l2c_jax.commands import convert_vae as mod
    from l2c_jax.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(mod.main, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.mark.parametrize("name", ["vae_tiny_diffusers.safetensors", "vae_tiny_ldm.pth"])
def test_truncated_file_refused(name, tmp_path, capsys):
    data = open(fixture_path("vae", name), "rb").read()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 3])
    code, _, err = _cli(["--checkpoint", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and len(err) == 1 and err[0].startswith("error: ") and "truncated or corrupt" in err[0]
    assert not (tmp_path / "o").exists()


def test_missing_file_refused(tmp_path, capsys):
    code, _, err = _cli(["--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and err == [f"error: {tmp_path / 'nope.safetensors'}: no such file"]


@pytest.mark.parametrize("file, key", [
    (DIFFUSERS_FILE, "encoder.mid_block.attentions.0.to_k.weight"),
    (DIFFUSERS_FILE, "decoder.up_blocks.0.upsamplers.0.conv.bias"),
    (LDM_FILE, "decoder.mid.attn_1.proj_out.bias"),
    (LDM_FILE, "encoder.down.1.block.0.nin_shortcut.weight"),
    (LDM_FILE, "encoder.conv_in.weight"),  # needed to read the architecture off the weights
])
def test_missing_key_named(file, key):
    sd = dict(load_checkpoint_file(fixture_path(*file)))
    del sd[key]
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        vae_params_from_state_dict(sd, "x")


def test_unexpected_and_misshaped_keys_named():
    sd = dict(load_checkpoint_file(fixture_path(*DIFFUSERS_FILE)))
    sd["encoder.mid_block.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    sd["decoder.conv_in.bias"] = np.zeros(65, np.float32)
    with pytest.raises(CheckpointError) as e:
        vae_params_from_state_dict(sd, "x")
    msg = str(e.value)
    assert "unexpected keys: encoder.mid_block.resnets.0.extra.weight" in msg
    assert "mis-shaped keys: decoder.conv_in.bias (65,) (expected (64,))" in msg
    assert "\n" not in msg


def test_mixed_or_foreign_naming_refused():
    sd = dict(load_checkpoint_file(fixture_path(*DIFFUSERS_FILE)))
    sd["encoder.down.0.block.0.norm1.weight"] = np.zeros(32, np.float32)
    with pytest.raises(CheckpointError, match="mix"):
        vae_params_from_state_dict(sd, "x")
    with pytest.raises(CheckpointError, match="not a KL autoencoder"):
        vae_params_from_state_dict({"blocks.0.w": np.zeros(1)}, "x")


def test_full_sd_checkpoint_prefix():
    sd = {f"first_stage_model.{k}": v for k, v in load_checkpoint_file(fixture_path(*LDM_FILE)).items()}
    sd["model.diffusion_model.x.weight"] = np.zeros(1, np.float32)
    config, _, naming, notes = vae_params_from_state_dict(sd, "x")
    assert naming == LDM and config.ch == 32 and "first_stage_model" in notes[0]


@pytest.mark.parametrize("naming, legacy", [(DIFFUSERS, False), (DIFFUSERS, True), (LDM, False)])
def test_naming_round_trip_with_attention_levels(naming, legacy):
    """Attention placement, the reversed diffusers decoder order and both attention forms survive a round trip."""
    config = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=2, embed_dim=3,
                       encoder_attn_levels=(1,), decoder_attn_levels=(0, 2))
    params = init_vae_params(config, seed=0)
    sd = vae_state_dict(params, config, naming, legacy)
    assert set(sd) == set(expected_keys(config, naming, legacy))
    if naming == DIFFUSERS:
        assert "decoder.up_blocks.2.attentions.1.group_norm.weight" in sd  # level 0 runs last
        assert "decoder.up_blocks.0.attentions.0." + ("query" if legacy else "to_q") + ".weight" in sd
        assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in sd and "decoder.up_blocks.2.upsamplers.0.conv.weight" not in sd
        assert sd["encoder.down_blocks.1.attentions.0." + ("proj_attn" if legacy else "to_out.0") + ".weight"].ndim == 2
    else:
        assert sd["encoder.down.1.attn.0.proj_out.weight"].shape == (64, 64, 1, 1)
    got_config, got, got_naming, _ = vae_params_from_state_dict(sd, "x")
    assert got_config == config and got_naming == naming
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))


@pytest.mark.slow
def test_full_size_config_shapes():
    """sd-vae-ft-ema's architecture (ch 128, ch_mult 1,2,4,4, 2 res-blocks, z 4) runs end to end."""
    config = VAEConfig()
    params = init_vae_params(config, seed=1)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert n == 83_653_863  # parameter count of diffusers' AutoencoderKL for sd-vae-ft-ema
    vae = VAE(config, params)
    x = jax.random.uniform(jax.random.key(2), (1, 16, 16, 3), minval=-1, maxval=1)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (1, 2, 2, 4)
    out = vae.decode(mean)
    assert out.shape == (1, 16, 16, 3) and bool(jnp.isfinite(out).all())
