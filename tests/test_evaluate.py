"""The in-tree ADM evaluator end to end: npz files -> features -> the five printed numbers, and bad input.

Most tests use a small stand-in with the Inception network's interface (a
fixed random projection of the preprocessed pixels), so they exercise file
handling, preprocessing, batching and the reference cache in seconds. One
test runs the real network with the fixtures' random weights on a few images.
"""

import importlib.util
import os
import re

import numpy as np
import pytest

from conftest import fixture_path
from l2c_jax.cli import run_main
from l2c_jax.commands.evaluate import main
from l2c_jax.errors import ConfigError
from l2c_jax.eval import adm, evaluator
from l2c_jax.eval.resize import resize_bilinear_legacy

# Covariances of a handful of images are singular; scipy says so, as the ADM evaluator would.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")

NAMES = ("Inception Score", "FID", "sFID", "Precision", "Recall")
POOL, SPATIAL = 64, 48


class StandIn:
    """`features(x)` / `fc_weight` as l2c_jax.eval.inception.InceptionNet, numpy alone."""

    def __init__(self, seed=0):
        rs = np.random.RandomState(seed)
        # Narrower than the real 2048 / 2023 / 1008 (the metrics take any width): a 2048-wide
        # matrix square root costs ~15 s here, and these tests are about the plumbing.
        self.w_pool = (rs.standard_normal((13 * 13 * 3, POOL)) * 0.05).astype(np.float32)
        self.w_spatial = (rs.standard_normal((13 * 13 * 3, SPATIAL)) * 0.05).astype(np.float32)
        self.fc_weight = (rs.standard_normal((POOL, 100)) * 0.1).astype(np.float32)
        self.batches = []

    def features(self, x):
        x = np.asarray(x, np.float32)
        assert x.shape[1:] == (299, 299, 3)
        self.batches.append(x)
        z = x[:, ::23, ::23, :].reshape(len(x), -1)
        pool = np.maximum(z @ self.w_pool, 0)
        return {"pool": pool, "spatial": np.maximum(z @ self.w_spatial, 0), "logits": pool @ self.fc_weight}


def _images(n, h, w, seed):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.uint8)


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return (_save(tmp_path / "samples.npz", arr_0=_images(7, 32, 32, 1)),
            _save(tmp_path / "ref.npz", arr_0=_images(9, 48, 40, 2)))


def _direct(net, samples, ref):
    """The same metrics, preprocessing done here by hand."""
    def feats(images):
        out = net.features((np.asarray(resize_bilinear_legacy(images, 299)) - 128.0) / 128.0)
        return {"pool": out["pool"], "spatial": out["spatial"]}
    return adm.compute_all(feats(ref), feats(samples), net.fc_weight)


def test_metrics_match_direct_computation(files):
    samples, ref = files
    net = StandIn()
    got = evaluator.evaluate(samples, ref, net, batch_size=4, progress=False)
    assert all(-1.0 <= b.min() and b.max() < 1.0 for b in net.batches)  # normalised as (x - 128) / 128
    assert [len(b) for b in net.batches] == [4, 4, 4, 4, 4]  # 9 ref + 7 samples, last batches padded
    want = _direct(StandIn(), np.load(samples)["arr_0"], np.load(ref)["arr_0"])
    assert set(got) == set(NAMES)
    for k in NAMES:
        assert abs(got[k] - want[k]) <= 1e-4 * max(1.0, abs(want[k])), (k, got[k], want[k])


def test_reference_cache_is_reused_and_invalidated(files, tmp_path):
    samples, ref = files
    first = evaluator.evaluate(samples, ref, StandIn(), batch_size=8, progress=False)
    cache = tmp_path / "ref.l2c_stats.npz"
    assert cache.is_file()
    net = StandIn()
    assert evaluator.evaluate(samples, ref, net, batch_size=8, progress=False) == first
    assert sum(len(b) for b in net.batches) == 8  # the samples only: the reference came from the cache
    # Another network (other weights): the cache does not apply.
    net = StandIn(seed=1)
    evaluator.evaluate(samples, ref, net, batch_size=8, progress=False)
    assert sum(len(b) for b in net.batches) == 24  # 9 references (padded to 16) and 7 samples (to 8)
    # A rewritten reference: recomputed.
    _save(ref, arr_0=_images(9, 48, 40, 3))
    os.utime(ref, ns=(1, 1))
    net = StandIn()
    assert evaluator.evaluate(samples, ref, net, batch_size=8, progress=False) != first
    assert sum(len(b) for b in net.batches) == 24


def test_stored_reference_statistics_are_used(files, tmp_path):
    samples, ref = files
    images = np.load(ref)["arr_0"]
    stats = {"mu": np.zeros(POOL), "sigma": np.eye(POOL), "mu_s": np.zeros(SPATIAL), "sigma_s": np.eye(SPATIAL)}
    ref2 = _save(tmp_path / "ref_stats.npz", arr_0=images, **stats)
    got = evaluator.evaluate(samples, ref2, StandIn(), progress=False, use_cache=False)
    plain = evaluator.evaluate(samples, ref, StandIn(), progress=False, use_cache=False)
    assert got["Precision"] == plain["Precision"] and got["Recall"] == plain["Recall"]
    sample_pool = _direct_pool(samples)
    assert abs(got["FID"] - adm.frechet_distance(*adm.statistics(sample_pool), stats["mu"], stats["sigma"])) < 1e-3


def _direct_pool(samples):
    x = (np.asarray(resize_bilinear_legacy(np.load(samples)["arr_0"], 299)) - 128.0) / 128.0
    return StandIn().features(x)["pool"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_command_prints_five_lines(files, monkeypatch, capsys, tmp_path):
    samples, ref = files
    monkeypatch.setattr(evaluator, "load_network", lambda directory: StandIn())
    code, out, err = _run(["--samples", samples, "--reference", ref, "--inception", str(tmp_path),
                           "--batch-size", "5"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(NAMES)
    for line in lines:
        assert re.fullmatch(r"[A-Za-z ]+: -?[0-9.]+(e[-+][0-9]+)?", line), line


BAD = {
    "no_arr_0": (lambda p: _save(p, images=_images(4, 8, 8, 0)), "no 'arr_0'"),
    "float_dtype": (lambda p: _save(p, arr_0=_images(4, 8, 8, 0).astype(np.float32)), "dtype float32"),
    "no_channels": (lambda p: _save(p, arr_0=_images(4, 8, 8, 0)[..., 0]), "expected (N, H, W, 3)"),
    "nchw": (lambda p: _save(p, arr_0=_images(4, 8, 8, 0).transpose(0, 3, 1, 2)), "expected (N, H, W, 3)"),
    "not_npz": (lambda p: (p.write_bytes(b"not a zip file"), str(p))[1], "not a readable .npz"),
    "missing": (lambda p: str(p), "not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_samples_fail_in_one_line(case, files, monkeypatch, capsys, tmp_path):
    _, ref = files
    make, message = BAD[case]
    bad = make(tmp_path / "bad.npz")
    monkeypatch.setattr(evaluator, "load_network", lambda directory: StandIn())
    code, out, err = _run(["--samples", bad, "--reference", ref, "--inception", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    # The reference is checked the same way.
    with pytest.raises(ConfigError, match="reference"):
        evaluator.evaluate(files[0], bad, StandIn(), progress=False)


def test_truncated_samples_fail_cleanly(tmp_path):
    path = _save(tmp_path / "s.npz", arr_0=_images(6, 16, 16, 0))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError):
        evaluator.evaluate(str(cut), path, StandIn(), progress=False)


@pytest.mark.slow
def test_real_network_with_random_weights(tmp_path):
    """The converted FID Inception-v3 (fixtures' random weights) through the whole path, a few images."""
    pytest.importorskip("l2c_jax.eval.inception")
    from l2c_jax.convert.inception import inception_params_from_state_dict, save_inception
    from l2c_jax.eval.inception import load_inception

    spec = importlib.util.spec_from_file_location("inception_random_weights",
                                                  fixture_path("inception", "random_weights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    save_inception(str(tmp_path / "net"), inception_params_from_state_dict(mod.state_dict(1501)))
    net = load_inception(str(tmp_path / "net"))
    samples = _save(tmp_path / "s.npz", arr_0=_images(3, 64, 48, 5))
    # Pool and spatial features as the evaluator feeds the network: uint8 -> legacy resize -> (x - 128) / 128.
    # (Not the full metrics: with 3 images a 2048-wide singular matrix square root is all the time spent.)
    have = evaluator.compute_features(net, evaluator.NpzImages(samples), batch_size=4, progress=False)
    x = (np.asarray(resize_bilinear_legacy(np.load(samples)["arr_0"], 299)) - 128.0) / 128.0
    x = np.concatenate([x, np.zeros_like(x[:1])])  # the same batch shape: one compilation
    want = net.features(x)
    assert have["pool"].shape == (3, 2048) and have["spatial"].shape == (3, 2023)
    for k in ("pool", "spatial"):
        np.testing.assert_allclose(have[k], want[k][:3], rtol=1e-4, atol=1e-5)
    assert np.isfinite(adm.inception_score(have["pool"], net.fc_weight))
