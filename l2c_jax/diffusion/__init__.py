"""Diffusion processes: DiT's Gaussian diffusion (DDIM / ancestral steps), the discrete VP schedule and DPM-Solver."""

from l2c_jax.diffusion.gaussian import (  # noqa: F401
    NUM_TRAIN_TIMESTEPS,
    GaussianDiffusion,
    betas_for_alpha_bar,
    create_diffusion,
    get_named_beta_schedule,
    respace_betas,
    space_timesteps,
)
from l2c_jax.diffusion.dpm_solver import DPMSolver  # noqa: F401,E402
from l2c_jax.diffusion.vp import DiscreteVPSchedule, stable_diffusion_betas  # noqa: F401,E402
