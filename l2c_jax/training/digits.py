"""The handwritten digits that scikit-learn bundles: 1797 8x8 images, 10 classes, no download.

Pixel intensities 0..16 are mapped to uint8 0..255 so the images go through
the same [-1, 1] pipeline as photographs.
"""

from __future__ import annotations

import numpy as np


def load_digits_u8() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8, 1) uint8, labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return imgs, d.target.astype(np.int64)
