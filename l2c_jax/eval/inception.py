"""`InceptionNet`: pytorch-fid's FID Inception-v3 with its weights, jitted; `load_inception` for converted dirs.

    net = load_inception("ckpt/inception_fid")    # written by convert/inception.py
    d = net.features(x)     # x (B, 299, 299, 3) float32, already normalised, e.g. (img - 128) / 128
    d["pool"]     (B, 2048)  FID features
    d["spatial"]  (B, 2023)  sFID features (Mixed_6d.branch1x1, 7 channels, NHWC-flattened)
    d["logits"]   (B, 1008)  fc(pool) with the bias
    net.fc_weight (2048, 1008) float32: the fc weight transposed (Inception Score: softmax(pool @ fc_weight))

Resizing and normalising are the caller's: the network sees `x` as given.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax import checkpoint, parallel
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.inception import IMAGE_SIZE, NUM_CLASSES, FIDInceptionV3, abstract_inception_params

FAMILY = "inception_fid"


class InceptionNet:
    """The network behind `features`; `apply(params, x)` is the pure version."""

    def __init__(self, params: Any, dtype=jnp.float32, batch_size: Optional[int] = None):
        self.params = parallel.place(params)
        self.dtype = dtype
        self.batch_size = batch_size
        self.module = FIDInceptionV3(dtype=dtype)
        self._apply = jax.jit(self.apply)

    def apply(self, params, x) -> Dict[str, jax.Array]:
        return self.module.apply({"params": params}, x)

    @property
    def fc_weight(self) -> np.ndarray:
        return np.asarray(self.params["fc"]["kernel"], np.float32)

    def features(self, x, batch_size: Optional[int] = -1) -> Dict[str, np.ndarray]:
        """x (B, 299, 299, 3) -> {"pool", "spatial", "logits"} as float32 NumPy arrays.

        With a batch size (the constructor's unless given; None = all at once)
        the input runs in chunks of that size, the last one padded so that a
        single shape is compiled.
        """
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ConfigError(f"Inception features: expected (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) NHWC, "
                              f"got shape {tuple(x.shape)}")
        chunk = self.batch_size if batch_size == -1 else batch_size
        n = x.shape[0]
        if not chunk or n <= chunk:
            return {k: np.asarray(v) for k, v in self._apply(self.params, x).items()}
        pad = (-n) % chunk
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
        parts = [jax.device_get(self._apply(self.params, x[i:i + chunk])) for i in range(0, n + pad, chunk)]
        return {k: np.concatenate([p[k] for p in parts], axis=0)[:n] for k in parts[0]}


def load_inception(directory: str, dtype=jnp.float32, batch_size: Optional[int] = None) -> InceptionNet:
    """Restores the network written by `convert/inception.py` (family "inception_fid")."""
    meta = checkpoint.read_model_meta(directory)
    if meta["family"] != FAMILY:
        raise CheckpointError(f"{directory}: holds a {meta['family']!r} model, not the FID Inception-v3 "
                              f"(convert it with convert/inception.py)")
    classes = meta["config"].get("num_classes", NUM_CLASSES) if isinstance(meta["config"], dict) else None
    if classes != NUM_CLASSES:
        raise CheckpointError(f"{directory}: invalid FID Inception config {meta['config']!r} "
                              f"(expected num_classes {NUM_CLASSES})")
    params = checkpoint.load_model_params(directory, meta, abstract_inception_params())
    return InceptionNet(params, dtype=dtype, batch_size=batch_size)
