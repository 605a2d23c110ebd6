"""A small digit classifier whose penultimate features define the digits FID.

Inception features mean nothing on 8x8 digits, so the project trains its own
feature extractor: an MLP (64 -> 128 -> 64 -> 10) on scikit-learn's digits,
full-batch Adam, deterministic. Its 64-d hidden layer is the feature space;
`train_classifier` reports held-out accuracy so the space is known to be
meaningful.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class DigitMLP(nn.Module):
    @nn.compact
    def __call__(self, x, features: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(nn.Dense(128, name="fc1")(x))
        h = nn.gelu(nn.Dense(64, name="fc2")(x))
        return h if features else nn.Dense(10, name="head")(h)


def train_classifier(seed: int = 0, steps: int = 600, holdout: int = 297):
    """Returns (params, held-out accuracy). Inputs are images in [-1, 1], (N, 8, 8, 1)."""
    from l2c_jax.training.data import to_model_range
    from l2c_jax.training.digits import load_digits_u8

    imgs, labels = load_digits_u8()
    x = to_model_range(imgs)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:holdout], perm[holdout:]
    model = DigitMLP()
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    opt = tx.init(params)
    xt, yt = jnp.asarray(x[train]), jnp.asarray(labels[train])
    key = jax.random.key(seed + 1)

    @jax.jit
    def step(params, opt, key):
        k_noise, key = jax.random.split(key)
        # light pixel noise keeps the features smooth around the data
        xn = xt + 0.1 * jax.random.normal(k_noise, xt.shape)

        def loss(p):
            logits = model.apply({"params": p}, xn)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()

        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, key

    for _ in range(steps):
        params, opt, key = step(params, opt, key)
    logits = model.apply({"params": params}, jnp.asarray(x[test]))
    acc = float((np.asarray(logits).argmax(-1) == labels[test]).mean())
    return params, acc


class DigitFeatures:
    """features(images in [-1,1]) -> (N, 64); fid_to_data(images) against all 1797 digits."""

    def __init__(self, seed: int = 0):
        from l2c_jax.training.data import to_model_range
        from l2c_jax.training.digits import load_digits_u8

        self.params, self.accuracy = train_classifier(seed)
        self._model = DigitMLP()
        self._apply = jax.jit(lambda p, x: self._model.apply({"params": p}, x, features=True))
        imgs, self.labels = load_digits_u8()
        self.data_features = self.features(to_model_range(imgs))

    def features(self, images) -> np.ndarray:
        return np.asarray(self._apply(self.params, jnp.asarray(images, jnp.float32)))

    def fid_to_data(self, images) -> float:
        from l2c_jax.eval.fid import fid

        return fid(self.features(images), self.data_features)
