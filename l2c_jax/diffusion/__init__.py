"""Diffusion processes: DiT's Gaussian diffusion (DDIM / ancestral steps over a respaced schedule)."""

from l2c_jax.diffusion.gaussian import (  # noqa: F401
    NUM_TRAIN_TIMESTEPS,
    GaussianDiffusion,
    betas_for_alpha_bar,
    create_diffusion,
    get_named_beta_schedule,
    respace_betas,
    space_timesteps,
)
