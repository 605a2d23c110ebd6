"""`l2c_jax.sample`: sampling with (or without) the learned layer cache."""

from __future__ import annotations

from typing import Optional

from l2c_jax.errors import ConfigError
from l2c_jax.sampling.dit import DiTSampler, computed_share  # noqa: F401


def sample(model, noise, y, solver: str = "ddim", steps: int = 50, cfg_scale: Optional[float] = None,
           router=None, threshold: Optional[float] = None, key=None, progress: bool = False, **kw):
    """Samples latents (API.md). With a router, the original's cache schedule applies."""
    masks = None
    if router is not None:
        if threshold is None:
            raise ConfigError("a router needs a threshold (the released DiT routers use 0.1, U-ViT 0.9)")
        if router.num_units != model.num_units:
            raise ConfigError(f"router has {router.num_units} columns, the model has {model.num_units} sub-layers")
        masks = router.masks(threshold)
    if model.family == "dit":
        if solver not in ("ddim", "ddpm"):
            raise ConfigError(f"DiT samples with 'ddim' or 'ddpm', not {solver!r}")
        if router is not None and router.steps != steps:
            raise ConfigError(f"router was trained for {router.steps} steps, sampling uses {steps}")
        return DiTSampler(model, steps, solver, cfg_scale, **kw)(noise, y, masks, key=key, progress=progress)
    raise ConfigError(f"no sampler for model family {model.family!r} yet")
