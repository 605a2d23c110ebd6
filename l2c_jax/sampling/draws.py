"""The random draws of a sampling job, each one a function of (seed, image index) only.

Image i's starting noise, label and per-step noise key do not depend on the
batch it lands in, the device count or the process count, so sharded,
resumed and multi-process jobs draw exactly what a one-batch run draws. The
sampling job (`l2c_jax.pipelines`) and the image-free router trainer's
trajectory recorder (`l2c_jax.training.trajectories`) both draw from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["sample_noise", "sample_step_keys", "draw_labels"]

# Independent random streams, each drawn per image from (seed, image index).
_NOISE, _LABEL, _STEP = range(3)


def _stream(seed: int, which: int):
    return jax.random.fold_in(jax.random.key(int(seed)), which)


@functools.partial(jax.jit, static_argnums=(1,))
def _normal_per_index(key, shape, indices):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(indices)


def sample_noise(seed: int, indices, shape) -> jax.Array:
    """The starting noise of images `indices`: image i's depends only on (seed, i), not on batches or devices."""
    return _normal_per_index(_stream(seed, _NOISE), tuple(shape), jnp.asarray(indices, jnp.int32))


def sample_step_keys(seed: int, indices) -> jax.Array:
    """Per-image PRNG keys for samplers that draw noise at every step (DDPM, DDIM with eta > 0)."""
    key = _stream(seed, _STEP)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.int32))


def draw_labels(seed: int, indices, num_classes: int) -> np.ndarray:
    """The class of images `indices`, uniform in [0, num_classes), image i's from (seed, i) only."""
    key = _stream(seed, _LABEL)
    idx = jnp.asarray(indices, jnp.int32)
    return np.asarray(jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_classes))(idx),
                      np.int64)
