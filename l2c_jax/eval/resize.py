"""TensorFlow 1's legacy bilinear resize, the one inside the ADM evaluator's Inception graph.

`tf.compat.v1.image.resize_bilinear(align_corners=False)` without half-pixel
centers: output pixel i samples the input at `i * in / out` (no +0.5 shift),
between `floor` and `ceil` of that clamped to the last pixel, with no
antialiasing when shrinking. `jax.image.resize` centres pixels and so differs
from it by up to a pixel's worth of shift; FID is sensitive to such shifts,
hence this port. The weights are computed in float32 in the same order as
TF's kernel (lerp along x within two rows, then along y), so results agree
with TensorFlow to float32 rounding.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _axis_weights(in_size: int, out_size: int):
    """(lower, upper, lerp) for one axis, computed in float32 as TF's legacy scaler does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src)
    lower = np.maximum(lo.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return lower, upper, (src - lo).astype(np.float32)


def resize_bilinear_legacy(images, size: int | Sequence[int] = 299):
    """Resize NHWC images (any float or integer dtype) to `size` (int or (h, w)); returns float32.

    Shapes are static (the gather indices are built at trace time), so this
    can sit inside `jax.jit`.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    x = jnp.asarray(images).astype(jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {x.shape}")
    in_h, in_w = x.shape[1], x.shape[2]
    y0, y1, ylerp = _axis_weights(in_h, out_h)
    x0, x1, xlerp = _axis_weights(in_w, out_w)
    xlerp = jnp.asarray(xlerp)[None, None, :, None]
    ylerp = jnp.asarray(ylerp)[None, :, None, None]

    def along_x(rows):
        left, right = jnp.take(rows, x0, axis=2), jnp.take(rows, x1, axis=2)
        return left + (right - left) * xlerp

    top = along_x(jnp.take(x, y0, axis=1))
    bottom = along_x(jnp.take(x, y1, axis=1))
    return top + (bottom - top) * ylerp
