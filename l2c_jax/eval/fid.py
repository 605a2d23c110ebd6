"""FID in any feature space (the digits classifier's, for the shipped model), and PSNR fidelity.

The statistics and the Fréchet distance are the ADM evaluator's (`l2c_jax.eval.adm`),
so the shipped model's FID and an ImageNet FID come from the same code.
"""

from __future__ import annotations

import numpy as np

from l2c_jax.eval.adm import frechet_distance, statistics


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def psnr(a, b, data_range: float = 2.0) -> float:
    """PSNR of images in [-1, 1] (range 2): fidelity of cached samples to uncached ones."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)
