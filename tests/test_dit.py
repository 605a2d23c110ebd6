"""DiT parity with the original PyTorch model, the cache contract, and the converter."""

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, ROOT, fixture_path
from l2c_jax import CheckpointError, load_model
from l2c_jax.convert.dit import convert_dit, infer_dit_config, state_dict_of
from l2c_jax.models.dit import DIT_VARIANTS, DiT, DiTConfig
from l2c_jax.models.layers import sincos_pos_embed_2d
from l2c_jax.torch_io import load_checkpoint_file, select_state_dict


FAMILY = "dit"  # the reference fixtures behind io / model / router (conftest)


def test_config_inferred_from_weights(model):
    with open(fixture_path("dit", "dit_tiny_config.json")) as f:
        ref = json.load(f)
    assert {k: getattr(model.config, k) for k in ref} == ref


def test_forward_matches_original(model, io):
    out, cache = model(nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(np.asarray(out), io["forward"].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert len(cache) == 8 and cache[0].shape == (4, 16, 64)


def test_cfg_forward_matches_original(model, io):
    out, _ = model.forward_with_cfg(nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"], float(io["cfg_scale"]))
    np.testing.assert_allclose(np.asarray(out), io["cfg_forward"].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_cfg_all_channels_option(model, io):
    x, t, y, s = nhwc(io["cfg_x"]), io["cfg_t"], io["cfg_y"], 4.0
    out3, _ = model.apply_cfg(model.params, x, t, y, s)
    out4, _ = model.apply_cfg(model.params, x, t, y, s, guidance_channels=None)
    raw, _ = model(jnp.concatenate([x[:2], x[:2]]), t, y)
    np.testing.assert_allclose(out3[..., 3:4], raw[..., 3:4], atol=1e-6)  # channel 3 unguided
    want = raw[2:, ..., :4] + s * (raw[:2, ..., :4] - raw[2:, ..., :4])
    np.testing.assert_allclose(out4[:2, ..., :4], want, atol=1e-5)
    np.testing.assert_allclose(out4[..., 4:], raw[..., 4:], atol=1e-6)  # variance channels never guided


def test_position_table_is_the_original_sincos():
    sd = select_state_dict(load_checkpoint_file(fixture_path("dit", "dit_tiny.pt")), "dit_tiny.pt")
    np.testing.assert_allclose(sincos_pos_embed_2d(64, 4), sd["pos_embed"][0], atol=1e-7)


def test_training_checkpoint_converts_to_the_same_weights(model):
    ema = convert_dit(fixture_path("dit", "dit_tiny_train_ckpt.pt"), num_heads=4)
    assert ema.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ema.params, model.params)
    # and the Flax tree maps back to exactly the original's state dict
    sd = select_state_dict(load_checkpoint_file(fixture_path("dit", "dit_tiny.pt")), "dit_tiny.pt")
    back = state_dict_of(model.params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_every_cached_call_of_the_original_is_reproduced(model, io):
    """Call i gets the cache of call i-1 and the mask of step i (l2c_masks)."""
    cache = None
    masks = io["l2c_masks"]
    for i in range(len(io["l2c_calls_x"])):
        mask = tuple(bool(m) for m in masks[i])
        out, cache = model(nhwc(io["l2c_calls_x"][i]), io["l2c_calls_t"][i], io["l2c_calls_y"][i],
                           cache=cache, mask=mask)
        ref = io["l2c_calls_out"][i].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0,
                                   err_msg=f"call {i}")


def test_all_true_mask_equals_no_cache(model, io):
    x = nhwc(io["x"])
    _, cache = model(x, io["t"], io["y"])
    plain, _ = model(x, io["t"], io["y"])
    full, _ = model(x, io["t"], io["y"], cache=cache, mask=(True,) * 8)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(full))


def test_beta_interpolates_every_unit_and_is_differentiable(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache = model(x * 0.5, t, y)
    full, _ = model(x, t, y)
    ones, _ = model(x, t, y, cache=cache, beta=jnp.ones(8))
    np.testing.assert_allclose(np.asarray(ones), np.asarray(full), atol=1e-6)
    reuse_all, _ = model(x, t, y, cache=cache, mask=(False,) * 8)
    zeros, _ = model(x, t, y, cache=cache, beta=jnp.zeros(8))
    np.testing.assert_allclose(np.asarray(zeros), np.asarray(reuse_all), atol=1e-6)

    def loss(beta):
        out, _ = model.apply(model.params, x, t, y, cache=cache, beta=beta)
        return jnp.mean((out - full) ** 2)

    g = jax.grad(loss)(jnp.full((8,), 0.5))
    assert g.shape == (8,) and np.all(np.isfinite(g)) and np.all(np.abs(g) > 0)


def test_reused_units_are_absent_from_the_compiled_graph():
    """FLOPs of the jitted call fall with each unit the static mask skips."""
    cfg = DiTConfig(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=10)
    m = DiT(cfg)
    x = jnp.zeros((2, 16, 16, 4))
    t = jnp.zeros((2,), jnp.int32)
    params = m.init(jax.random.key(0), x, t, t)["params"]
    _, cache = m.apply({"params": params}, x, t, t)

    def flops(mask):
        fn = jax.jit(lambda p, c: m.apply({"params": p}, x, t, t, c, mask))
        lowered = fn.lower(params, cache)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]), lowered.as_text()

    full, hlo_full = flops(None)
    attn_off = tuple(i % 2 == 1 for i in range(8))       # every attention reused
    mlp_off = tuple(i % 2 == 0 for i in range(8))        # every MLP reused
    none_on = (False,) * 8
    f_attn, hlo_attn = flops(attn_off)
    f_mlp, _ = flops(mlp_off)
    f_none, hlo_none = flops(none_on)
    # Per block and token: attention 4*D^2*2 (qkv+proj) + 2*N*D*2 (scores, values), MLP 8*D^2*2.
    n, d = 64, 128
    attn_unit = 2 * (4 * d * d + 2 * n * d) * n * 2
    mlp_unit = 2 * 8 * d * d * n * 2
    assert abs((full - f_attn) - 4 * attn_unit) / (4 * attn_unit) < 0.05
    assert abs((full - f_mlp) - 4 * mlp_unit) / (4 * mlp_unit) < 0.05
    assert abs((full - f_none) - 4 * (attn_unit + mlp_unit)) / (4 * (attn_unit + mlp_unit)) < 0.05
    # One softmax over the (B, heads, N, N) scores per computed attention, none when reused.
    def softmaxes(hlo):
        return sum(1 for line in hlo.splitlines() if "exponential" in line and "2x4x64x64" in line)
    assert (softmaxes(hlo_full), softmaxes(hlo_attn), softmaxes(hlo_none)) == (4, 0, 0)


@pytest.mark.slow
def test_every_released_variant_builds():
    from l2c_jax.model import abstract_params
    for name, (depth, hidden, patch, heads) in DIT_VARIANTS.items():
        cfg = DiTConfig.from_name(name, input_size=32)
        p = abstract_params("dit", cfg)
        assert len([k for k in p if k.startswith("blocks_")]) == depth
        assert p["x_embedder"]["proj"]["kernel"].shape == (patch, patch, 4, hidden)
    xl = abstract_params("dit", DiTConfig.from_name("DiT-XL/2", input_size=32))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(xl))
    assert n == 675_129_632  # DiT-XL/2 at 256 px: the original's parameter count incl. pos_embed


def test_non_square_latents_and_no_learn_sigma():
    cfg = DiTConfig(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False, class_dropout_prob=0.0)
    m = DiT(cfg)
    x = jnp.ones((1, 8, 8, 4))
    params = m.init(jax.random.key(1), x, jnp.zeros(1), jnp.zeros(1, jnp.int32))["params"]
    assert params["y_embedder"]["embedding_table"]["embedding"].shape == (3, 32)
    out, _ = m.apply({"params": params}, x, jnp.zeros(1), jnp.zeros(1, jnp.int32))
    assert out.shape == (1, 8, 8, 4)


# ---------------------------------------------------------------- converter CLI


def run_convert(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert", "dit.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_cli_round_trip(tmp_path, model, io):
    out_dir = tmp_path / "dit"
    r = run_convert("--checkpoint", fixture_path("dit", "dit_tiny_train_ckpt.pt"), "--num-heads", "4",
                    "--out", str(out_dir))
    assert r.returncode == 0, r.stderr
    loaded = load_model(str(out_dir))
    assert loaded.config == model.config
    out, _ = loaded(nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(np.asarray(out), io["forward"].transpose(0, 2, 3, 1), atol=1e-5)


def _assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("as_torch_zip", [True, False])
def test_refuses_pickle_payload(tmp_path, as_torch_zip):
    """A checkpoint whose unpickling would run code (here: create a file) is refused, and nothing runs."""
    import torch
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    sd = torch.load(fixture_path("dit", "dit_tiny.pt"), weights_only=True)
    obj = {"model": sd, "trap": _Payload(str(marker))}
    if as_torch_zip:
        torch.save(obj, bad)  # the layout torch.save writes, payload inside data.pkl
    else:
        with open(bad, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # a legacy bare pickle
    assert not marker.exists()
    r = run_convert("--checkpoint", str(bad), "--num-heads", "4", "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "refused")
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_refuses_truncated_file(tmp_path):
    data = open(fixture_path("dit", "dit_tiny.pt"), "rb").read()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    r = run_convert("--checkpoint", str(bad), "--num-heads", "4", "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "half.pt")


def test_refuses_missing_file(tmp_path):
    r = run_convert("--checkpoint", str(tmp_path / "nope.pt"), "--num-heads", "4", "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "no such file")


@pytest.mark.slow
def test_refuses_wrong_architecture(tmp_path):
    r = run_convert("--checkpoint", fixture_path("dit", "dit_tiny.pt"), "--model", "DiT-XL/2",
                    "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "DiT-XL/2", "depth 4")


def test_refuses_missing_heads(tmp_path):
    r = run_convert("--checkpoint", fixture_path("dit", "dit_tiny.pt"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "--num-heads")


@pytest.mark.slow
def test_mismatched_keys_are_named(tmp_path):
    import torch
    sd = torch.load(fixture_path("dit", "dit_tiny.pt"), weights_only=True)
    del sd["blocks.2.mlp.fc1.bias"]
    sd["blocks.1.attn.extra.weight"] = torch.zeros(3)
    sd["blocks.3.attn.proj.weight"] = torch.zeros(64, 32)
    bad = tmp_path / "edited.pt"
    torch.save(sd, bad)
    r = run_convert("--checkpoint", str(bad), "--num-heads", "4", "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "blocks.2.mlp.fc1.bias", "blocks.1.attn.extra.weight", "blocks.3.attn.proj.weight")


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_infer_config_rejects_bad_heads():
    sd = select_state_dict(load_checkpoint_file(fixture_path("dit", "dit_tiny.pt")), "x")
    with pytest.raises(Exception, match="divisible"):
        infer_dit_config(sd, "x", num_heads=5)
