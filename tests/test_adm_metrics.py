"""The ADM evaluator's metrics on known features, against what its own code computes (adm_expected.json)."""

import functools
import importlib.util
import json

import numpy as np
import pytest

from conftest import fixture_path
from l2c_jax.eval import adm


@functools.cache
def _features():
    spec = importlib.util.spec_from_file_location("adm_features", fixture_path("adm", "features.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make(2024)


@pytest.fixture(scope="module")
def expected():
    with open(fixture_path("adm", "adm_expected.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def metrics():
    f = _features()
    return adm.compute_all({"pool": f["ref_pool"], "spatial": f["ref_spatial"]},
                           {"pool": f["sample_pool"], "spatial": f["sample_spatial"]}, f["softmax_w"])


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["Inception Score", "FID", "sFID"])
def test_exact_metrics(metrics, expected, key):
    assert _rel(metrics[key], expected[key]) < 1e-5, (metrics[key], expected[key])


def test_inception_score_split_1000(expected):
    f = _features()
    got = adm.inception_score(f["sample_pool"], f["softmax_w"], split_size=1000)
    assert _rel(got, expected["Inception Score (split_size=1000)"]) < 1e-5


@pytest.mark.parametrize("key,n", [("Precision", 2500), ("Recall", 3000)])
def test_precision_recall_within_a_few_samples(metrics, expected, key, n):
    # The evaluator's float16 distances are emulated, not reproduced bit for bit (fixtures README).
    assert abs(metrics[key] - expected[key]) * n <= 5, (metrics[key], expected[key])


def test_stored_statistics_are_used():
    """With stored statistics (as the ADM reference batches carry) FID and sFID come from them: the same
    numbers as from the reference's features, and the spatial features are never read. On the first 64
    feature dimensions, where the 2048-d matrix square roots would take a minute."""
    f = _features()
    d = 64
    ref = {"pool": f["ref_pool"][:, :d], "spatial": f["ref_spatial"][:, :d]}
    sample = {"pool": f["sample_pool"][:500, :d], "spatial": f["sample_spatial"][:500, :d]}
    want = adm.compute_all(ref, sample, f["softmax_w"][:d])
    mu, sigma = adm.statistics(ref["pool"])
    mu_s, sigma_s = adm.statistics(ref["spatial"])
    stored = {"pool": ref["pool"], "spatial": None, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    got = adm.compute_all(stored, sample, f["softmax_w"][:d])
    assert set(got) == {"Inception Score", "FID", "sFID", "Precision", "Recall"}
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert want["FID"] > 0 and want["sFID"] > 0
    # and they are what is used: other statistics give another FID
    moved = adm.compute_all(dict(stored, mu=mu + 1.0), sample, f["softmax_w"][:d])
    assert moved["FID"] > want["FID"] + 1.0 and moved["sFID"] == pytest.approx(want["sFID"])


def test_frechet_distance_small_cases():
    rs = np.random.RandomState(0)
    a = rs.standard_normal((400, 5))
    mu, sigma = adm.statistics(a)
    assert abs(adm.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Diagonal covariances: sum (mu diff)^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    want = 1.0 + (1 + 9 - 2 * 3) + (4 + 1 - 2 * 2)
    assert abs(adm.frechet_distance([0.0, 1.0], np.diag(s1), [1.0, 1.0], np.diag(s2)) - want) < 1e-9
    with pytest.raises(ValueError):
        adm.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_float16_distances_fall_back_to_float32():
    # Norms beyond float16's 65504 overflow: the block must come back finite, from float32.
    u = np.full((4, 8), 200.0, np.float32)
    v = np.zeros((5, 8), np.float32)
    d = adm.pairwise_distances(u, v)
    assert d.dtype == np.float32 and np.isfinite(d).all()
    np.testing.assert_allclose(d, 8 * 200.0 ** 2, rtol=1e-6)


def test_blocking_does_not_change_results():
    f = _features()
    ref, sample = f["ref_pool"][:300], f["sample_pool"][:200]
    whole = adm.precision_recall(ref, sample)
    blocked = adm.precision_recall(ref, sample, row_batch=128, col_batch=96)
    assert whole == blocked
