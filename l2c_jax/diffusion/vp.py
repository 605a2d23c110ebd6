"""The discrete-time VP noise schedule seen in continuous time (DPM-Solver's `NoiseScheduleVP('discrete')`).

A model trained on N discrete timesteps n = 1..N with betas `b_1..b_N` is
solved as an ODE over continuous time t in [1/N, 1]: knot i (0-based) sits at
t_i = (i + 1) / N with log alpha_{t_i} = 0.5 * sum_{j<=i} log(1 - b_j), and
log alpha_t is piecewise linear between knots (linear extrapolation outside).
Then sigma_t = sqrt(1 - alpha_t^2), lambda_t = log alpha_t - log sigma_t (the
half log-SNR), and `inverse_lambda` maps lambda back to t through the same
interpolation. The model sees time `t * N` ("continuous time x 1000" for the
U-ViT ImageNet models, see `model_time`).

Numerical convention (the U-ViT sampler's parity depends on it): the original
casts the float64 betas to float32 and builds the knots in float32
(`torch.log(1 - betas).cumsum()`), then evaluates every function above in
float32 with the formulas written here (e.g. sigma from `1 - exp(2 log
alpha)`, not `-expm1`). The knots are made the same way (1 - b rounded to
float32, its log summed with a float64 accumulator as PyTorch's CPU cumsum
does, then float32): they equal the original's bit for bit but for ~1% one
unit in the last place. The functions run in float32 JAX, on host values
and inside `jax.jit`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


def stable_diffusion_betas(linear_start: float = 0.00085, linear_end: float = 0.012,
                           num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The "scaled linear" betas of Stable Diffusion (float64), used by the U-ViT latent ImageNet models:
    `linspace(linear_start**0.5, linear_end**0.5, N)**2`.
    """
    n = int(num_timesteps)
    if n < 2:
        raise ConfigError(f"a beta schedule needs at least 2 timesteps, got {n}")
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=np.float64) ** 2


def interpolate(x, xp, yp):
    """Piecewise-linear interpolation through knots (xp increasing), extended linearly beyond the ends.

    The original's `interpolate_fn`: the outermost segments define the
    function outside [xp[0], xp[-1]]. x: any shape; xp, yp: (K,), K >= 2.
    The value is `y_a + (x - x_a) * (y_b - y_a) / (x_b - x_a)` in the
    original's operation order; a knot maps exactly to its own y.
    """
    x = jnp.asarray(x, jnp.float32)
    xp = jnp.asarray(xp, jnp.float32)
    yp = jnp.asarray(yp, jnp.float32)
    k = xp.shape[0]
    # side="right" puts a value equal to knot j on the segment starting at j,
    # so it interpolates to exactly yp[j]. Comparing against all knots compiles
    # and runs faster than the default scan for the few values solvers look up.
    method = "compare_all" if x.size <= 4096 else "sort"
    i = jnp.clip(jnp.searchsorted(xp, x, side="right", method=method) - 1, 0, k - 2)
    x0, x1, y0, y1 = xp[i], xp[i + 1], yp[i], yp[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


# The schedule functions are jitted pure functions of the knots: called on host
# values (time grids) they run as one compiled program instead of dozens of
# eagerly dispatched ops; inside a caller's jit they simply inline.
@jax.jit
def _log_alpha(t, t_knots, log_alpha_knots):
    return interpolate(t, t_knots, log_alpha_knots)


@jax.jit
def _std(t, t_knots, log_alpha_knots):
    return jnp.sqrt(1.0 - jnp.exp(2.0 * interpolate(t, t_knots, log_alpha_knots)))


@jax.jit
def _lambda(t, t_knots, log_alpha_knots):
    log_mean = interpolate(t, t_knots, log_alpha_knots)
    log_std = 0.5 * jnp.log(1.0 - jnp.exp(2.0 * log_mean))
    return log_mean - log_std


@jax.jit
def _inverse_lambda(lamb, t_knots, log_alpha_knots):
    lamb = jnp.asarray(lamb, jnp.float32)
    log_alpha = -0.5 * jnp.logaddexp(jnp.zeros((), jnp.float32), -2.0 * lamb)
    # log alpha decreases with t: interpolate over the reversed (increasing) knots.
    return interpolate(log_alpha, log_alpha_knots[::-1], t_knots[::-1])


class DiscreteVPSchedule:
    """`NoiseScheduleVP('discrete', betas=... | alphas_cumprod=...)` of DPM-Solver.

    Give exactly one of `betas` (N,) or `alphas_cumprod` (N,); any float
    dtype, used as float32 for the continuous view (as the original's
    `torch.tensor(betas).float()`). Times are continuous, in [1/N, T=1].
    Instances hash by identity, so they can be static `jax.jit` arguments.
    """

    T = 1.0

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ConfigError("give exactly one of betas or alphas_cumprod")
        if betas is not None:
            b = np.asarray(betas, dtype=np.float64)
            if b.ndim != 1 or b.size < 2:
                raise ConfigError(f"betas must be a 1-D array of at least 2 values, got shape {b.shape}")
            if not ((b > 0).all() and (b < 1).all()):
                raise ConfigError("betas must lie in (0, 1)")
            one_minus = (np.float32(1) - b.astype(np.float32)).astype(np.float64)  # 1 - b in float32
            log_alpha = 0.5 * np.cumsum(np.log(one_minus))
            self.betas: Optional[np.ndarray] = b
            self.alphas_cumprod = np.cumprod(1.0 - b)
        else:
            ac = np.asarray(alphas_cumprod, dtype=np.float64)
            if ac.ndim != 1 or ac.size < 2:
                raise ConfigError(f"alphas_cumprod must be a 1-D array of at least 2 values, got shape {ac.shape}")
            if not ((ac > 0).all() and (ac < 1).all() and (np.diff(ac) < 0).all()):
                raise ConfigError("alphas_cumprod must decrease strictly within (0, 1)")
            log_alpha = 0.5 * np.log(ac.astype(np.float32).astype(np.float64))
            self.betas = None
            self.alphas_cumprod = ac
        self.total_N = int(log_alpha.shape[0])
        # float32 knots: t_i = (i + 1) / N and log alpha at those times.
        self.t_knots = np.linspace(1.0 / self.total_N, 1.0, self.total_N).astype(np.float32)
        self.log_alpha_knots = log_alpha.astype(np.float32)
        if not (np.diff(self.log_alpha_knots) < 0).all():
            raise ConfigError("log alpha must decrease strictly over the schedule (float32 knots); "
                              "betas too small to resolve")
        for a in (self.t_knots, self.log_alpha_knots, self.alphas_cumprod):
            a.setflags(write=False)

    @classmethod
    def stable_diffusion(cls, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "DiscreteVPSchedule":
        """The schedule the U-ViT ImageNet latent models sample with."""
        return cls(betas=stable_diffusion_betas(num_timesteps=num_timesteps))

    # -- the continuous view (float32 JAX; scalars or arrays) --------------------
    @property
    def eps(self) -> float:
        """The smallest time of the schedule, 1/N (where sampling usually ends)."""
        return 1.0 / self.total_N

    def marginal_log_mean_coeff(self, t):
        """log alpha_t."""
        return _log_alpha(t, self.t_knots, self.log_alpha_knots)

    def marginal_alpha(self, t):
        return jnp.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        """sigma_t = sqrt(1 - alpha_t^2), the original's float32 formula."""
        return _std(t, self.t_knots, self.log_alpha_knots)

    def marginal_lambda(self, t):
        """lambda_t = log alpha_t - log sigma_t."""
        return _lambda(t, self.t_knots, self.log_alpha_knots)

    def inverse_lambda(self, lamb):
        """The time t with lambda_t = lamb: log alpha = -0.5 log(1 + exp(-2 lamb)), then invert the knots."""
        return _inverse_lambda(lamb, self.t_knots, self.log_alpha_knots)

    def model_time(self, t):
        """The time input of a model trained on the N discrete steps: `t * N` in float32.

        The original U-ViT sampler calls the network with `t_continuous * N`
        (no shift by 1/N), so t = 1 is 1000.0 and t = 1/N is 1.0.
        """
        return jnp.asarray(t, jnp.float32) * jnp.float32(self.total_N)

    # -- the discrete view (float64 NumPy) ----------------------------------------
    def discrete_timesteps(self, t) -> np.ndarray:
        """round(N * t) as int64, in float32 arithmetic as the original's `np.round(timesteps * 1000)`:
        the integer timestep of continuous time t (the router trainer's, and the router rows' time axis)."""
        return np.round(np.asarray(t, np.float32) * np.float32(self.total_N)).astype(np.int64)

    def discrete_alphas_cumprod(self) -> np.ndarray:
        """(N + 1,) float64: entry n = prod_{j<=n} (1 - b_j) for timesteps n = 1..N, entry 0 = 1.

        The router trainer's `Schedule.cum_alphas`: noising to discrete time n
        is `sqrt(ac[n]) x0 + sqrt(1 - ac[n]) eps`, with n = round(N * t).
        """
        return np.concatenate([[1.0], self.alphas_cumprod])

    def __repr__(self):
        return f"DiscreteVPSchedule(N={self.total_N})"
