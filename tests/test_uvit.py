"""U-ViT parity with the original PyTorch model, the cache contract (column order), and the converter."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, ROOT, fixture_path
from l2c_jax import CheckpointError, ConfigError, load_model
from l2c_jax.convert.uvit import infer_uvit_config, state_dict_of
from l2c_jax.models.uvit import UVIT_VARIANTS, UViT, UViTConfig
from l2c_jax.torch_io import load_checkpoint_file, select_state_dict


FAMILY = "uvit"  # the reference fixtures behind io / model / router (conftest)


def assert_close(out, ref_nchw, err_msg=""):
    # The original's own float32 output is ~1.2e-5 from the float64 answer on
    # `forward` (outputs up to ~3.8), see test_closer_to_float64_than_reference:
    # compare to 1e-5 relative to the output scale (absolute below 1).
    ref = np.asarray(ref_nchw).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * max(1.0, np.abs(ref).max()), rtol=0,
                               err_msg=err_msg)


def test_config_inferred_from_weights(model, conv_model):
    with open(fixture_path("uvit", "uvit_tiny_config.json")) as f:
        ref = json.load(f)
    for m, key in ((model, "tiny"), (conv_model, "tiny_conv")):
        assert m.config == UViTConfig(**ref[key])
        assert m.config.num_blocks == 5 and m.config.num_units == 10
        assert m.config.in_channels == 4
    assert model.config.null_class == 10 and conv_model.config.null_class is None


def test_forward_matches_original(model, io):
    out, cache = model(nhwc(io["x"]), io["t"], io["y"])
    assert out.shape == (4, 8, 8, 4) and out.dtype == jnp.float32
    assert_close(out, io["forward"])
    assert len(cache) == 10 and all(c.shape == (4, 2 + 16, 64) for c in cache)


def test_forward_conv_model_matches_original(conv_model, io):
    out, cache = conv_model(nhwc(io["x"]), io["t"])  # unconditional, MLP time embedding, final 3x3 conv
    assert_close(out, io["forward_conv_model"])
    assert len(cache) == 10 and cache[0].shape == (4, 1 + 16, 64)


def test_closer_to_float64_than_reference(model, io):
    """Our float32 forward is nearer the float64 result than the original's float32 output."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), model.params)
        m64 = UViT(model.config, dtype=jnp.float64)
        o64, _ = m64.apply({"params": p64}, jnp.asarray(np.asarray(nhwc(io["x"])), jnp.float64),
                           jnp.asarray(io["t"], jnp.float64), jnp.asarray(io["y"]))
        o64 = np.asarray(o64, np.float64)
    out, _ = model(nhwc(io["x"]), io["t"], io["y"])
    ref = io["forward"].transpose(0, 2, 3, 1)
    ours, theirs = np.abs(np.asarray(out) - o64).max(), np.abs(ref - o64).max()
    assert ours < 1e-5 and theirs < 2e-5 and ours <= theirs


def test_weights_map_back_to_the_original_state_dict(model, conv_model):
    for m, name in ((model, "uvit_tiny.pth"), (conv_model, "uvit_tiny_conv.pth")):
        sd = select_state_dict(load_checkpoint_file(fixture_path("uvit", name)), name)
        back = state_dict_of(m.params)
        assert sorted(back) == sorted(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])


def test_every_cached_call_of_the_original_is_reproduced(model, io):
    """Calls run (cond, uncond) x (first eval, midpoint eval) per DPM-Solver-2 step.

    Each call gets the cache of the previous call of its own branch; the first
    evaluation of step k > 0 uses mask `l2c_masks[k]` (its reuse pattern), all
    others are full. Matching every call proves the column order: in_blocks,
    mid_block, out_blocks; attention 2j, MLP 2j+1.
    """
    masks = io["l2c_masks"]
    n_calls = len(io["l2c_calls_x"])
    assert n_calls == 4 * len(masks)
    caches = [None, None]  # cond, uncond
    reused = 0
    for i in range(n_calls):
        step, first_eval, branch = i // 4, (i // 2) % 2 == 0, i % 2
        mask = tuple(bool(m) for m in masks[step]) if (first_eval and step > 0) else None
        if mask is not None:
            reused += mask.count(False)
        y = io["l2c_calls_y"][i]
        assert (y == model.config.null_class).all() == (branch == 1)
        out, caches[branch] = model(nhwc(io["l2c_calls_x"][i]), io["l2c_calls_t"][i], y,
                                    cache=caches[branch], mask=mask)
        assert_close(out, io["l2c_calls_out"][i], err_msg=f"call {i}")
    assert reused > 0  # the run really reuses sub-layers


def test_a_wrong_column_order_is_detected(model, io):
    """Sanity check of the test above: a mask with shuffled columns gives a different output."""
    masks = io["l2c_masks"]
    k = next(k for k in range(1, len(masks)) if not masks[k].all() and masks[k].any())
    i = 4 * k  # the cond first evaluation of step k; its cache is the cond midpoint call of step k-1
    _, cache = model(nhwc(io["l2c_calls_x"][i - 2]), io["l2c_calls_t"][i - 2], io["l2c_calls_y"][i - 2])
    ref = io["l2c_calls_out"][i].transpose(0, 2, 3, 1)
    mask = tuple(bool(m) for m in masks[k])
    right, _ = model(nhwc(io["l2c_calls_x"][i]), io["l2c_calls_t"][i], io["l2c_calls_y"][i], cache=cache, mask=mask)
    wrong, _ = model(nhwc(io["l2c_calls_x"][i]), io["l2c_calls_t"][i], io["l2c_calls_y"][i], cache=cache,
                     mask=mask[::-1])
    if mask != mask[::-1]:
        assert np.abs(np.asarray(wrong) - ref).max() > 1e-3
    np.testing.assert_allclose(np.asarray(right), ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_all_true_mask_equals_no_cache(model, io):
    x = nhwc(io["x"])
    _, cache = model(x * 0.5, io["t"], io["y"])
    plain, _ = model(x, io["t"], io["y"])
    full, _ = model(x, io["t"], io["y"], cache=cache, mask=(True,) * 10)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(full))


def test_reuse_returns_the_cached_units(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache = model(x * 0.5, t, y)
    mask = tuple(i % 3 != 0 for i in range(10))
    _, new = model(x, t, y, cache=cache, mask=mask)
    for i, keep in enumerate(mask):
        if not keep:
            np.testing.assert_array_equal(np.asarray(new[i]), np.asarray(cache[i]))
        else:
            assert np.abs(np.asarray(new[i]) - np.asarray(cache[i])).max() > 0


def test_beta_interpolates_every_unit_and_is_differentiable(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache = model(x * 0.5, t, y)
    full, _ = model(x, t, y)
    ones, _ = model(x, t, y, cache=cache, beta=jnp.ones(10))
    np.testing.assert_allclose(np.asarray(ones), np.asarray(full), atol=1e-6)
    reuse_all, _ = model(x, t, y, cache=cache, mask=(False,) * 10)
    zeros, _ = model(x, t, y, cache=cache, beta=jnp.zeros(10))
    np.testing.assert_allclose(np.asarray(zeros), np.asarray(reuse_all), atol=1e-6)

    def loss(beta):
        out, _ = model.apply(model.params, x, t, y, cache=cache, beta=beta)
        return jnp.mean((out - full) ** 2)

    g = jax.jit(jax.grad(loss))(jnp.full((10,), 0.5))
    assert g.shape == (10,) and np.all(np.isfinite(g)) and np.all(np.abs(g) > 0)


def test_reused_units_are_absent_from_the_compiled_graph():
    """FLOPs of the jitted call fall by exactly the units the static mask skips."""
    cfg = UViTConfig(img_size=16, patch_size=2, in_chans=4, embed_dim=128, depth=4, num_heads=4, num_classes=11)
    m = UViT(cfg)
    x = jnp.zeros((2, 16, 16, 4))
    t = jnp.zeros((2,))
    y = jnp.zeros((2,), jnp.int32)
    params = m.init(jax.random.key(0), x, t, y)["params"]
    _, cache = m.apply({"params": params}, x, t, y)

    def flops(mask):
        fn = jax.jit(lambda p, c: m.apply({"params": p}, x, t, y, c, mask))
        lowered = fn.lower(params, cache)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]), lowered.as_text()

    full, hlo_full = flops(None)
    # Half the units reused: the attention of blocks 0, 2, 4 and the MLP of blocks 1, 3.
    mask = (False, True, True, False, False, True, True, False, False, True)
    half, hlo_half = flops(mask)
    n, d = 2 + 64, 128
    attn_unit = 2 * (4 * d * d + 2 * n * d) * n * 2  # qkv + proj, scores + values; batch 2
    mlp_unit = 2 * 8 * d * d * n * 2
    # XLA counts the exact (erf) GELU as tens of flops per element, and the
    # norms, softmax and residual adds go with their units: allow that on top.
    matmuls = 3 * attn_unit + 2 * mlp_unit
    gelu_elems = 2 * 2 * n * 4 * d
    assert matmuls < full - half < matmuls + 100 * gelu_elems + 0.05 * matmuls
    assert half < 0.6 * full
    # The reused units' ops are gone from the lowered program: per attention 4 dots
    # (qkv, scores, values, proj) and the softmax's exponential (the time embedding
    # keeps one), per MLP 2 dots.
    assert hlo_full.count("dot_general") - hlo_half.count("dot_general") == 3 * 4 + 2 * 2
    assert hlo_full.count("exponential") - hlo_half.count("exponential") == 3


def test_released_variants():
    from l2c_jax.model import abstract_params

    for name, (embed, depth, heads, patch) in UVIT_VARIANTS.items():
        cfg = UViTConfig.from_name(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (embed, depth, heads, patch)
        assert embed % heads == 0 and cfg.num_units == 2 * (depth + 1)
    assert UViTConfig.from_name("U-ViT-H/2").num_units == 58
    # The original's parameter counts (its torch module built on the meta device):
    # U-ViT-H/2 (conv=False, as configs/imagenet256_uvit_huge.py) and U-ViT-L/2
    # (conv=True, the constructor default that configs/imagenet256_uvit_large.py keeps), ImageNet 256.
    h2 = abstract_params("uvit", UViTConfig.from_name("U-ViT-H/2"))
    assert len([k for k in h2 if k.startswith("in_blocks_")]) == len([k for k in h2 if k.startswith("out_blocks_")]) == 14
    assert h2["patch_embed"]["proj"]["kernel"].shape == (2, 2, 4, 1152)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(h2)) == 500_832_016
    l2 = abstract_params("uvit", UViTConfig.from_name("U-ViT-L/2", conv=True))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(l2)) == 286_763_172


def test_label_and_shape_errors(model, conv_model, io):
    x = nhwc(io["x"])
    with pytest.raises(ConfigError, match="pass y"):
        model(x, io["t"])
    with pytest.raises(ConfigError, match="unconditional"):
        conv_model(x, io["t"], io["y"])
    with pytest.raises(ConfigError, match="NHWC"):
        model(jnp.zeros((1, 4, 8, 8)), io["t"][:1], io["y"][:1])
    with pytest.raises(ConfigError, match="10 cacheable"):
        model(x, io["t"], io["y"], mask=(True,) * 8)


def test_infer_config_errors():
    sd = select_state_dict(load_checkpoint_file(fixture_path("uvit", "uvit_tiny.pth")), "x")
    with pytest.raises(ConfigError, match="divisible"):
        infer_uvit_config(sd, "x", num_heads=5)
    with pytest.raises(ConfigError, match="--num-heads"):
        infer_uvit_config(sd, "x")
    with pytest.raises(ConfigError, match="unknown U-ViT"):
        infer_uvit_config(sd, "x", model="U-ViT-X/2")
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        infer_uvit_config({k: v for k, v in sd.items() if k != "patch_embed.proj.weight"}, "x", num_heads=4)


# ---------------------------------------------------------------- converter CLI


def run_convert(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert", "uvit.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def _assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _run_in_process(capsys, *args):
    """The CLI's main under run_main, in this process (no interpreter start-up)."""
    from l2c_jax.cli import run_main

    from l2c_jax.commands import convert_uvit as mod
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, e.value.code, captured.out, captured.err)


@pytest.mark.slow
def test_cli_round_trip(tmp_path, conv_model, io):
    out_dir = tmp_path / "uvit"
    r = run_convert("--checkpoint", fixture_path("uvit", "uvit_tiny_conv.pth"), "--num-heads", "4",
                    "--out", str(out_dir))
    assert r.returncode == 0, r.stderr
    assert "10 cacheable" in r.stdout
    loaded = load_model(str(out_dir))
    assert loaded.family == "uvit" and loaded.config == conv_model.config
    out, _ = loaded(nhwc(io["x"]), io["t"])
    assert_close(out, io["forward_conv_model"])


def test_refuses_missing_key(tmp_path, capsys):
    import torch

    sd = torch.load(fixture_path("uvit", "uvit_tiny.pth"), weights_only=True)
    del sd["out_blocks.1.mlp.fc2.bias"]
    sd["mid_block.attn.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "edited.pth"
    torch.save(sd, bad)
    r = _run_in_process(capsys, "--checkpoint", str(bad), "--num-heads", "4", "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "out_blocks.1.mlp.fc2.bias", "mid_block.attn.extra.weight")
    assert not (tmp_path / "o").exists()


def test_refuses_wrong_architecture(tmp_path, capsys):
    r = _run_in_process(capsys, "--checkpoint", fixture_path("uvit", "uvit_tiny.pth"), "--model", "U-ViT-H/2",
                        "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "U-ViT-H/2", "depth 4", "width 64")
    assert not (tmp_path / "o").exists()


def test_refuses_missing_heads(tmp_path, capsys):
    r = _run_in_process(capsys, "--checkpoint", fixture_path("uvit", "uvit_tiny.pth"), "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "--num-heads")


def test_refuses_missing_file(tmp_path, capsys):
    r = _run_in_process(capsys, "--checkpoint", str(tmp_path / "nope.pth"), "--model", "U-ViT-H/2",
                        "--out", str(tmp_path / "o"))
    _assert_one_line_error(r, "no such file")
