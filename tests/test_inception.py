"""pytorch-fid's FID Inception-v3 in Flax: conversion of its state dict and parity with its outputs.

The checkpoint is the fixtures' seeded random state dict (the same names and
shapes as `pt_inception-2015-12-05-6726825d.pth`); inception_io.npz holds what
pytorch-fid's own network computes from it.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import fixture_path, rel_err
from l2c_jax.cli import run_main
from l2c_jax.commands.convert_inception import main

SEED = 1501
TOL = 1e-4


def _random_state_dict():
    spec = importlib.util.spec_from_file_location("inception_random_weights",
                                                  fixture_path("inception", "random_weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.state_dict(SEED)


def _save(sd, path):
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, str(path))
    return str(path)


def _convert(checkpoint, out):
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--checkpoint", checkpoint, "--out", str(out)])
    return e.value.code


@pytest.fixture(scope="module")
def state_dict():
    return _random_state_dict()


@pytest.fixture(scope="module")
def converted(state_dict, tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    ckpt = _save(state_dict, d / "pt_inception_random.pth")
    assert _convert(ckpt, d / "net") == 0
    return d / "net"


@pytest.fixture(scope="module")
def outputs(converted):
    from l2c_jax.eval.inception import load_inception

    io = dict(np.load(fixture_path("inception", "inception_io.npz")))
    net = load_inception(str(converted))
    x = io["images"].astype(np.float32) / 127.5 - 1  # the fixture's preprocessing (no resize)
    return net, net.features(x), io


@pytest.mark.slow
def test_directory_layout(converted):
    with open(os.path.join(converted, "config.json")) as f:
        meta = json.load(f)
    assert meta["family"] == "inception_fid" and meta["format_version"] == 1
    assert os.path.isdir(os.path.join(converted, "params"))


@pytest.mark.parametrize("key,shape", [("pool", (4, 2048)), ("spatial", (4, 2023)), ("logits", (4, 1008))])
def test_features_match_pytorch_fid(outputs, key, shape):
    _, got, io = outputs
    assert got[key].shape == shape and got[key].dtype == np.float32
    err = rel_err(got[key], io[key])
    assert err < TOL, f"{key}: max relative error {err:.2e}"
    # the outputs tell the four images apart far beyond the tolerance
    assert rel_err(got[key][1:], io[key][:-1]) > 100 * TOL


def test_fc_weight_and_inception_score_logits(outputs, state_dict):
    net, got, _ = outputs
    w = net.fc_weight
    assert w.shape == (2048, 1008) and w.dtype == np.float32
    np.testing.assert_array_equal(w, state_dict["fc.weight"].T)
    np.testing.assert_allclose(got["pool"] @ w + state_dict["fc.bias"], got["logits"], rtol=0, atol=1e-4)


def test_batched_features_equal_whole(outputs):
    net, got, io = outputs
    x = io["images"][:3].astype(np.float32) / 127.5 - 1
    part = net.features(x, batch_size=2)  # two chunks, the last padded
    for k in got:
        np.testing.assert_allclose(part[k], got[k][:3], rtol=0, atol=1e-5 * np.abs(got[k]).max())


def test_wrong_input_shape_is_refused(outputs):
    from l2c_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="299"):
        outputs[0].features(np.zeros((1, 256, 256, 3), np.float32))


def test_without_num_batches_tracked_converts(state_dict, tmp_path):
    from l2c_jax.convert.inception import convert_inception

    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(state_dict)
    params = convert_inception(_save(sd, tmp_path / "released_like.pth"))
    np.testing.assert_array_equal(params["Mixed_6d"]["branch1x1"]["bn"]["running_var"],
                                  state_dict["Mixed_6d.branch1x1.bn.running_var"])
    np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["conv"]["kernel"],
                                  state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("case", ["missing", "misshaped", "unexpected"])
def test_bad_checkpoint_is_refused_in_one_line(state_dict, tmp_path, capsys, case):
    sd = dict(state_dict)
    if case == "missing":
        key = "Mixed_5b.branch5x5_1.bn.running_var"
        del sd[key]
    elif case == "misshaped":
        key = "Mixed_7c.branch_pool.conv.weight"
        sd[key] = np.zeros((192, 2048, 3, 3), np.float32)
    else:
        key = "AuxLogits.fc.weight"
        sd[key] = np.zeros((1008, 768), np.float32)
    assert _convert(_save(sd, tmp_path / "bad.pth"), tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert f"{case.replace('misshaped', 'mis-shaped')} keys: {key}" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_sampling_job_scores_itself(converted, tmp_path):
    """`--config.evaluate.reference` makes the sampling job print the ADM evaluator's five lines."""
    import json

    from l2c_jax.cli import parse_config_flags
    from l2c_jax.pipelines import run_sampling

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    config, _ = parse_config_flags(["--config", "configs/dit_sample.py:smoke", "--config.repeats=0",
                                    f"--config.evaluate.reference={ref}", f"--config.evaluate.inception={converted}",
                                    "--config.evaluate.batch_size=8"])
    lines = []
    result = run_sampling(config, str(tmp_path / "w"), report=lines.append)
    scored = [ln for ln in lines if ln.split(":")[0] in ("Inception Score", "FID", "sFID", "Precision", "Recall")]
    assert [ln.split(":")[0] for ln in scored] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert all(np.isfinite(v) for v in result["metrics"].values())
    assert json.load(open(tmp_path / "w" / "report.json"))["metrics"]["FID"] == result["metrics"]["FID"]
    assert (tmp_path / "w" / "samples.npz").exists()


def test_sampling_job_refuses_a_missing_reference_before_sampling(converted, tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.errors import ConfigError
    from l2c_jax.pipelines import run_sampling

    config, _ = parse_config_flags(["--config", "configs/dit_sample.py:smoke",
                                    f"--config.evaluate.reference={tmp_path / 'nope.npz'}",
                                    f"--config.evaluate.inception={converted}"])
    with pytest.raises(ConfigError, match="no such file"):
        run_sampling(config, str(tmp_path / "w"), report=lambda *_: None)
    assert not (tmp_path / "w").exists()
