"""`VAE`: the KL autoencoder with its parameters, jitted, and `load_vae` for converted directories.

    vae = load_vae("ckpt/sd_vae_ft_ema")
    mean, logvar = vae.encode(images)              # NHWC in [-1, 1]
    z = vae.sample_posterior(mean, logvar, key) * vae.scaling_factor
    images = vae.decode(z / vae.scaling_factor)

No latent scaling happens inside: `scaling_factor` (0.18215 for the Stable
Diffusion autoencoders) is for the sampler to apply.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from l2c_jax import checkpoint, parallel
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params

FAMILY = "vae"
# The decoder is the memory peak of sampling (full-resolution activations at
# up to 512 channels); a fixed chunk keeps it bounded and compiles once.
DEFAULT_CHUNK_SIZE = 8


@jax.jit
def _sample_posterior(mean, logvar, key):
    std = jnp.exp(0.5 * logvar)
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def _in_chunks(fn, params, x, chunk: Optional[int]):
    n = x.shape[0]
    if not chunk or n <= chunk:
        return fn(params, x)
    # Padding the last chunk keeps one compiled shape; samples never interact
    # (GroupNorm is per sample), so the padding cannot leak into the results.
    pad = (-n) % chunk
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
    outs = [fn(params, x[i:i + chunk]) for i in range(0, n + pad, chunk)]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0)[:n], *outs)


class VAE:
    """The autoencoder behind the API.md calls; `apply_encode` / `apply_decode` are the pure versions."""

    def __init__(self, config: VAEConfig, params: Any, dtype=jnp.float32,
                 chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, mesh=None):
        self.config = config
        self.params = parallel.place(params, mesh)  # once on the devices; restored trees already are
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.module = AutoencoderKL(config, dtype=dtype)
        self._encode = jax.jit(self.apply_encode)
        self._decode = jax.jit(self.apply_decode)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def apply_encode(self, params, images):
        return self.module.apply({"params": params}, images, method=AutoencoderKL.encode)

    def apply_decode(self, params, latents):
        return self.module.apply({"params": params}, latents, method=AutoencoderKL.decode)

    def apply_moments(self, params, images):
        """quant_conv output before the split and clamp (the LDM `moments`)."""
        return self.module.apply({"params": params}, images, method=AutoencoderKL.moments)

    def _check(self, x, channels, what):
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ConfigError(f"VAE {what}: expected (B, H, W, {channels}) NHWC, got shape {tuple(x.shape)}")
        return x

    def encode(self, images, chunk_size: Optional[int] = -1):
        """images (B,H,W,C) in [-1, 1] -> (mean, logvar) of the posterior, logvar clamped to [-30, 20]."""
        x = self._check(images, self.config.in_channels, "encode")
        return _in_chunks(self._encode, self.params, x, self.chunk_size if chunk_size == -1 else chunk_size)

    def decode(self, latents, chunk_size: Optional[int] = -1):
        """Unscaled latents (B,h,w,embed_dim) -> images (B,h*f,w*f,C), in batches of `chunk_size`."""
        z = self._check(latents, self.config.embed_dim, "decode")
        return _in_chunks(self._decode, self.params, z, self.chunk_size if chunk_size == -1 else chunk_size)

    @staticmethod
    def sample_posterior(mean, logvar, key):
        """mean + exp(logvar / 2) * N(0, 1), with an explicit PRNG key."""
        return _sample_posterior(mean, logvar, key)

    def save(self, directory: str, overwrite: bool = False, **extra) -> None:
        checkpoint.write_model_dir(directory, FAMILY, self.config.to_dict(), self.params, overwrite=overwrite,
                                   **extra)


def load_vae(directory: str, dtype=jnp.float32, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
             mesh=None) -> VAE:
    """Restores an autoencoder written by `convert/vae.py` (or `VAE.save`), replicated over `mesh`
    (default: all devices)."""
    meta = checkpoint.read_model_meta(directory)
    if meta["family"] != FAMILY:
        raise CheckpointError(f"{directory}: holds a {meta['family']!r} model, not a VAE "
                              f"(load it with l2c_jax.load_model)")
    try:
        config = VAEConfig.from_dict(meta["config"])
    except (TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{directory}: invalid VAE config: {e}") from None
    params = checkpoint.load_model_params(directory, meta, abstract_vae_params(config), mesh=mesh)
    return VAE(config, params, dtype=dtype, chunk_size=chunk_size, mesh=mesh)
