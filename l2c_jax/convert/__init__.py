"""PyTorch -> Flax weight conversion: generic naming rules and a strict check."""

from l2c_jax.convert.rules import torch_to_flax, flax_to_torch_name  # noqa: F401
