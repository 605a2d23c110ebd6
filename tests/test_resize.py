"""The TF1 legacy bilinear resize of the ADM evaluator's Inception graph, against TensorFlow itself."""

import jax
import numpy as np
import pytest

from l2c_jax.eval.resize import resize_bilinear_legacy

SIZES = [(32, 32), (64, 64), (256, 256), (512, 512), (48, 80), (300, 17), (299, 299)]


def _tf_resize(images, size):
    tf = pytest.importorskip("tensorflow")  # a test-only dependency
    return tf.compat.v1.image.resize_bilinear(images.astype(np.float32), size, align_corners=False).numpy()


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_matches_tensorflow_legacy_bilinear(hw):
    images = np.random.RandomState(hw[0] * 1000 + hw[1]).randint(0, 256, (2,) + hw + (3,)).astype(np.uint8)
    ref = _tf_resize(images, [299, 299])
    out = np.asarray(resize_bilinear_legacy(images, 299))
    assert out.shape == (2, 299, 299, 3) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-5
    # Under jit XLA fuses the lerps into FMAs: a few float32 ulps of 255, i.e. ~2e-7 after (x - 128) / 128.
    jitted = np.asarray(jax.jit(resize_bilinear_legacy, static_argnums=1)(images, 299))
    assert np.abs(jitted - ref).max() / 255.0 <= 1e-6


def test_non_square_output_and_identity():
    images = np.random.RandomState(0).randint(0, 256, (1, 40, 30, 3)).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(resize_bilinear_legacy(images, (23, 57))),
                               _tf_resize(images, [23, 57]), atol=1e-5, rtol=0)
    # Same size: scale 1, every weight 0, the image itself.
    np.testing.assert_array_equal(np.asarray(resize_bilinear_legacy(images, (40, 30))), images.astype(np.float32))


def test_differs_from_half_pixel_resize():
    """The reason for this port: jax.image.resize centres pixels, the legacy kernel does not."""
    images = np.random.RandomState(1).randint(0, 256, (1, 64, 64, 3)).astype(np.float32)
    centred = np.asarray(jax.image.resize(images, (1, 299, 299, 3), "bilinear", antialias=False))
    assert np.abs(np.asarray(resize_bilinear_legacy(images, 299)) - centred).max() > 1.0
