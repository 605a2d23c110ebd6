"""Image output: [-1, 1] float -> uint8, PNG grids, the ADM evaluator's npz."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """NHWC in [-1, 1] -> uint8, as DiT's sample_ddp.py (clamp(127.5*x + 128))."""
    x = np.asarray(images, np.float32)
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def make_grid(images_u8: np.ndarray, nrow: int = 8, padding: int = 2) -> np.ndarray:
    n, h, w, c = images_u8.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = images_u8[k]
    return grid


def save_png(path: str, array_u8: np.ndarray, upscale: int = 1) -> None:
    from PIL import Image

    a = array_u8
    if a.shape[-1] == 1:
        a = a[..., 0]
    elif a.shape[-1] > 3:
        a = a[..., :3]
    img = Image.fromarray(a)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def save_npz(path: str, images_u8: np.ndarray) -> None:
    """`arr_0` holds (N, H, W, 3) uint8: the format the ADM evaluator reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, arr_0=images_u8)
