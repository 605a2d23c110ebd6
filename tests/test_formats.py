"""Format versions: model directories and routers load at the current version and refuse, in one line,
versions they cannot read (newer, too old, missing, garbage)."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import ROOT
from l2c_jax import formats
from l2c_jax.checkpoint import CONFIG_FILE, read_model_meta, write_model_dir
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.model import Model, load_model
from l2c_jax.models.dit import DiTConfig
from l2c_jax.models.vae import VAEConfig, init_vae_params
from l2c_jax.router import Router, load_router, save_router
from l2c_jax.vae import VAE, load_vae

TINY_DIT = DiTConfig(input_size=8, patch_size=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                     learn_sigma=False, class_dropout_prob=0.0)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=2, embed_dim=2)


def _refused(match, fn, *args, **kw):
    with pytest.raises(CheckpointError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# ------------------------------------------------------------------ the rule itself


def test_rule_accepts_current_and_readable_older():
    assert formats.check_format_version(3, 3, "thing", "f", "redo it") == 3
    assert formats.check_format_version("3", 3, "thing", "f", "redo it") == 3  # safetensors metadata is text
    assert formats.check_format_version(2, 3, "thing", "f", "redo it", oldest=2) == 2


def test_rule_refusals():
    chk = formats.check_format_version
    msg = _refused("newer", chk, 4, 3, "thing", "f", "redo it")
    assert msg == "f: written by a newer l2c_jax (thing format 4, this reads up to 3): upgrade l2c_jax"
    msg = _refused("too old", chk, 1, 3, "thing", "f", "redo it", oldest=2)
    assert "format 1" in msg and "2 to 3" in msg and msg.endswith("redo it")
    msg = _refused("too old", chk, 2, 3, "thing", "f", "redo it")
    assert "reads format 3" in msg and msg.endswith("redo it")
    for garbage in ("abc", "1.0", 1.0, "", " 1", "-1", 0, "0", -2, True, None, [1], {"v": 1}, "1\n2" * 50):
        msg = _refused("not a positive integer", chk, garbage, 3, "thing", "f", "redo it")
        assert msg.endswith("redo it")
    msg = _refused("no format_version", chk, None, 3, "thing", "f", "redo it", missing=True)
    assert msg.endswith("redo it")


# ------------------------------------------------------------------ model directories


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dit") / "model")
    Model.random("dit", TINY_DIT).save(d, source="test")
    return d


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = os.path.join(dst, CONFIG_FILE)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return str(dst)


def test_model_dir_records_current_version(dit_dir):
    meta = read_model_meta(dit_dir)
    assert meta["format_version"] == formats.MODEL_DIR_VERSION == 1
    assert meta["source"] == "test"
    m = load_model(dit_dir)
    assert m.family == "dit" and m.config == TINY_DIT


def test_model_dir_as_written_by_earlier_releases_loads(dit_dir, tmp_path):
    # Every earlier commit wrote exactly {"family", "config", "format_version": 1, extras} (git log -p).
    d = _edited_copy(dit_dir, tmp_path / "v1", lambda m: m.update(format_version=1))
    assert load_model(d).config == TINY_DIT
    shipped = os.path.join(ROOT, "assets", "digits", "dit")
    if os.path.isdir(shipped):
        assert read_model_meta(shipped)["format_version"] == 1


@pytest.mark.parametrize("value, match", [
    (2, r"written by a newer l2c_jax \(model directory format 2, this reads up to 1\): upgrade l2c_jax"),
    (99, "newer"),
    ("abc", "'abc' is not a positive integer"),
    (1.5, "1.5 is not a positive integer"),
    (None, "None is not a positive integer"),
    (0, "0 is not a positive integer"),
    (True, "True is not a positive integer"),
])
def test_model_dir_bad_versions_refused(dit_dir, tmp_path, value, match):
    d = _edited_copy(dit_dir, tmp_path / "m", lambda m: m.update(format_version=value))
    msg = _refused(match, load_model, d)
    assert msg.startswith(os.path.join(d, CONFIG_FILE) + ": ")
    if value != 2 and value != 99:
        assert "python convert/dit.py --checkpoint" in msg


def test_model_dir_missing_version_refused(dit_dir, tmp_path):
    d = _edited_copy(dit_dir, tmp_path / "m", lambda m: m.pop("format_version"))
    msg = _refused("no format_version", load_model, d)
    assert "convert/dit.py" in msg


def test_newer_model_dir_refused_before_its_layout_is_read(dit_dir, tmp_path):
    # A newer format may rename keys: the version is what the user needs to hear about.
    def edit(m):
        m["format_version"] = 2
        m["model"] = m.pop("config")
    d = _edited_copy(dit_dir, tmp_path / "m", edit)
    _refused("newer l2c_jax", load_model, d)


def test_foreign_config_json_refused(tmp_path):
    d = tmp_path / "diffusers"
    d.mkdir()
    (d / CONFIG_FILE).write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    msg = _refused("no format_version", load_model, str(d))
    assert "convert/{dit,uvit,vae}.py" in msg
    (d / CONFIG_FILE).write_text("[1, 2]")
    _refused("expected a JSON object", load_model, str(d))


def test_vae_dir_versions(tmp_path):
    d = str(tmp_path / "vae")
    VAE(TINY_VAE, init_vae_params(TINY_VAE)).save(d)
    assert load_vae(d).config == TINY_VAE
    bad = _edited_copy(d, tmp_path / "newer", lambda m: m.update(format_version=7))
    _refused(r"newer l2c_jax \(model directory format 7, this reads up to 1\)", load_vae, bad)
    bad = _edited_copy(d, tmp_path / "garbage", lambda m: m.update(format_version="v1"))
    msg = _refused("not a positive integer", load_vae, bad)
    assert "python convert/vae.py" in msg


def test_extra_metadata_cannot_replace_the_version(tmp_path):
    with pytest.raises(ConfigError, match="format_version"):
        write_model_dir(str(tmp_path / "m"), "dit", {"depth": 1}, {"w": np.zeros(2, np.float32)},
                        format_version=5)
    assert not os.path.exists(tmp_path / "m")


# ------------------------------------------------------------------ routers


def _router():
    rng = np.random.default_rng(0)
    return Router(prob=rng.normal(size=(4, 6)).astype(np.float32), kind="dit-ddim", threshold=0.25)


def _rewrite_meta(path, **changes):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, framework="numpy") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors, path, metadata=meta)


def test_router_current_version_loads(tmp_path):
    src = _router()
    path = save_router(src, tmp_path / "r.safetensors")
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["format_version"] == str(formats.ROUTER_VERSION) == "3"
    back = load_router(path)
    np.testing.assert_array_equal(back.prob, src.prob)
    assert back.kind == "dit-ddim" and back.threshold == 0.25
    # The shipped routers were written with format_version "1" (no learned forecasts): they load as they are.
    shipped = os.path.join(ROOT, "assets", "digits", "router_ddim20.safetensors")
    with safe_open(shipped, framework="numpy") as f:
        assert f.metadata()["format_version"] == "1"
    assert load_router(shipped).steps == 20 and load_router(shipped).coefs is None
    assert load_router(shipped).anchors is None
    # Version 2 (learned forecasts, periodic full steps) loads as it is too.
    learned = os.path.join(ROOT, "assets", "digits", "router_ddim50_k4_taylor2_learned_l1x5.safetensors")
    with safe_open(learned, framework="numpy") as f:
        assert f.metadata()["format_version"] == "2"
    assert load_router(learned).coefs is not None and load_router(learned).anchors is None


@pytest.mark.parametrize("value, match", [
    ("4", r"written by a newer l2c_jax \(router format 4, this reads up to 3\): upgrade l2c_jax"),
    ("abc", "router format_version 'abc' is not a positive integer"),
    ("1.0", "'1.0' is not a positive integer"),
    ("", "'' is not a positive integer"),
    ("0", "'0' is not a positive integer"),
])
def test_router_bad_versions_refused(tmp_path, value, match):
    path = save_router(_router(), tmp_path / "r.safetensors")
    _rewrite_meta(path, format_version=value)
    msg = _refused(match, load_router, path)
    assert msg.startswith(path + ": ")
    if value != "4":
        assert "python convert/router.py --checkpoint ROUTER.pt --kind dit-ddim" in msg


def test_router_missing_version_refused(tmp_path):
    path = save_router(_router(), tmp_path / "dir")  # a directory holding router.safetensors
    _rewrite_meta(path, format_version=None)
    msg = _refused("no format_version", load_router, tmp_path / "dir")
    assert "convert/router.py" in msg


def test_newer_router_with_another_layout_refused_by_version(tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "r.safetensors")
    save_file({"logits": np.zeros((2, 4, 6), np.float32)}, path,
              metadata={"format": "l2c_jax.router", "format_version": "4", "kind": "dit-ddim"})
    _refused("newer l2c_jax", load_router, path)
    save_file({"logits": np.zeros((2, 4, 6), np.float32)}, path,
              metadata={"format": "l2c_jax.router", "format_version": "1", "kind": "dit-ddim"})
    _refused("without a 2-D 'prob'", load_router, path)


def test_torch_file_with_prob_is_not_the_project_format(tmp_path):
    import torch

    path = str(tmp_path / "r.pt")
    torch.save({"prob": torch.zeros(4, 6)}, path)
    _refused(r"not an l2c_jax.router file \(not a safetensors file\)", load_router, path)
