"""l2c_jax: Learning-to-Cache for diffusion transformers in JAX/Flax."""

from l2c_jax.errors import CheckpointError, ConfigError, L2CError  # noqa: F401
from l2c_jax.model import Model, load_model  # noqa: F401
from l2c_jax.router import Router, load_router  # noqa: F401
from l2c_jax.sampling import sample  # noqa: F401
from l2c_jax.vae import VAE, load_vae  # noqa: F401

__version__ = "0.1.0"
