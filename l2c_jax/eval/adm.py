"""The ADM evaluator's metrics (openai/guided-diffusion `evaluations/evaluator.py`) on given features.

Inception Score, FID (pool_3 features), sFID (the first 7 channels of
`mixed_6/conv`) and improved precision / recall (k-NN manifolds, k = 3), with
the evaluator's definitions: IS is the softmax of `pool @ softmax_w` (weight
only, no bias) in splits of 5000; FID uses `mu = mean`, `sigma = np.cov(rowvar=False)`
and regularises a singular covariance product with eps = 1e-6 on the
diagonals; precision / recall use squared Euclidean distances computed in
float16, falling back to float32 for a block whose float16 distances are not
all finite. This module emulates that float16 arithmetic so that precision and
recall land within a few samples of the evaluator rather than the ~10 samples
that plain float32 distances miss by (see ../shared/fixtures/README.md, adm/).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

# The evaluator's ManifoldEstimator block sizes: the float32 fallback is decided per
# block, so the same blocking reproduces the same fallback decisions.
ROW_BATCH = 10000
COL_BATCH = 10000


def inception_score(pool: np.ndarray, softmax_w: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` samples, averaged over splits."""
    logits = np.asarray(pool, np.float32) @ np.asarray(softmax_w, np.float32)  # float32, as the TF graph
    logits = logits.astype(np.float64)
    # log-softmax rather than log(softmax): a probability that underflows to 0 would give 0 * -inf = nan.
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for i in range(0, len(p), split_size):
        part, logpart = p[i:i + split_size], logp[i:i + split_size]
        log_marginal = np.log(part.mean(0, keepdims=True))
        kl = np.sum(part * (logpart - log_marginal), 1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a feature set: the evaluator's mean and `np.cov(rowvar=False)`, in float64."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with the evaluator's singular-product handling."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # The product is (near) singular: retry with eps on both diagonals, as the evaluator does.
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding leaves a small imaginary part; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T in float32 at full precision, on the default jax device (the 10000 x 10000 blocks are the cost)."""
    import jax
    import jax.numpy as jnp

    out = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
    return np.asarray(out)


def _distances_f16(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The evaluator's float16 graph, rounding where TF's half kernels round.

    Inputs, the element squares, the squared norms (summed in float32), the
    matrix product (products of float16 numbers are exact in float32; summed in
    float32) and each of the two additions are rounded to float16.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is what triggers the fallback
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
        norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
        prod = _matmul_t(u16, v16).astype(np.float16)
        d = (norm_u[:, None] - np.float16(2) * prod) + norm_v[None, :]
        return np.maximum(d, np.float16(0))


def _distances_f32(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u, v = u.astype(np.float32), v.astype(np.float32)
    norm_u, norm_v = np.square(u).sum(1), np.square(v).sum(1)
    return np.maximum((norm_u[:, None] - np.float32(2) * _matmul_t(u, v)) + norm_v[None, :], np.float32(0))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared distances of one block, float32: float16 unless any is non-finite (the evaluator's DistanceBlock)."""
    d = _distances_f16(u, v)
    if not np.isfinite(d).all():
        return _distances_f32(u, v)
    return d.astype(np.float32)


def manifold_radii(features: np.ndarray, k: int = 3, row_batch: int = ROW_BATCH,
                   col_batch: int = COL_BATCH) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour (itself at distance 0 included, as index 0)."""
    n = len(features)
    radii = np.zeros([n], np.float32)
    for r0 in range(0, n, row_batch):
        rows = features[r0:r0 + row_batch]
        # Keep only the k+1 smallest per column block: the k-th smallest overall is among them,
        # and the full row x N matrix (2 GB for 50k references) is never held.
        smallest = []
        for c0 in range(0, n, col_batch):
            d = pairwise_distances(rows, features[c0:c0 + col_batch])
            m = min(k + 1, d.shape[1])
            smallest.append(np.partition(d, m - 1, axis=1)[:, :m] if m < d.shape[1] else d)
        cand = np.concatenate(smallest, axis=1)
        radii[r0:r0 + len(rows)] = np.partition(cand, k, axis=1)[:, k]
    return radii


def precision_recall(ref_pool: np.ndarray, sample_pool: np.ndarray, k: int = 3,
                     row_batch: int = ROW_BATCH, col_batch: int = COL_BATCH) -> tuple[float, float]:
    """(precision, recall): the fraction of samples inside the reference manifold, and of references inside the samples'."""
    ref = np.asarray(ref_pool, np.float32)
    sample = np.asarray(sample_pool, np.float32)
    if len(ref) <= k or len(sample) <= k:
        raise ValueError(f"precision/recall need more than k={k} features per set, got {len(ref)} and {len(sample)}")
    radii_ref = manifold_radii(ref, k, row_batch, col_batch)
    radii_sample = manifold_radii(sample, k, row_batch, col_batch)
    ref_in = np.zeros([len(ref)], bool)        # reference inside the sample manifold -> recall
    sample_in = np.zeros([len(sample)], bool)  # sample inside the reference manifold -> precision
    for r0 in range(0, len(ref), row_batch):
        for c0 in range(0, len(sample), col_batch):
            d = pairwise_distances(ref[r0:r0 + row_batch], sample[c0:c0 + col_batch])
            ref_in[r0:r0 + row_batch] |= np.any(d <= radii_sample[None, c0:c0 + col_batch], axis=1)
            sample_in[c0:c0 + col_batch] |= np.any(d <= radii_ref[r0:r0 + row_batch, None], axis=0)
    return float(sample_in.mean()), float(ref_in.mean())


def compute_all(ref: Mapping[str, np.ndarray], sample: Mapping[str, np.ndarray],
                softmax_w: np.ndarray) -> dict[str, float]:
    """All five numbers the evaluator prints.

    `ref` and `sample` hold `pool` (N, 2048) and `spatial` (N, 2023) features;
    `ref` may carry stored statistics `mu`, `sigma`, `mu_s`, `sigma_s` (as the
    ADM reference batches do), which are then used for FID / sFID instead of
    its features (its `pool` is still needed for precision / recall).
    """
    if all(key in ref for key in ("mu", "sigma", "mu_s", "sigma_s")):
        ref_stats, ref_stats_s = (ref["mu"], ref["sigma"]), (ref["mu_s"], ref["sigma_s"])
    else:
        ref_stats, ref_stats_s = statistics(ref["pool"]), statistics(ref["spatial"])
    # The evaluator measures sample -> reference (mu1 = samples); the order only moves rounding.
    fid = frechet_distance(*statistics(sample["pool"]), *ref_stats)
    sfid = frechet_distance(*statistics(sample["spatial"]), *ref_stats_s)
    precision, recall = precision_recall(ref["pool"], sample["pool"])
    return {
        "Inception Score": inception_score(sample["pool"], softmax_w),
        "FID": fid,
        "sFID": sfid,
        "Precision": precision,
        "Recall": recall,
    }
