"""DiT's training objective (ADM's `training_losses` with a learned range variance).

loss = mean-flat MSE of the predicted noise + the variational-bound term that
trains the variance output (with the mean output frozen inside it), both per
sample, at a uniformly drawn timestep of the full 1000-step process; labels
are dropped to the null class with probability `label_dropout` for CFG.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 8 bits (ADM's decoder term)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def dit_training_loss(params, model_apply, diffusion, x0, y, key, *, null_class: int, label_dropout: float = 0.1):
    """Per-batch mean loss and its parts. model_apply(params, x, t, y) -> NHWC output (2C channels)."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape)
    y = jnp.where(jax.random.uniform(k_drop, (b,)) < label_dropout, null_class, y)
    x_t = diffusion.q_sample(x0, t, noise)
    out = model_apply(params, x_t, diffusion.model_timesteps(t), y)
    c = x0.shape[-1]
    eps, v = out[..., :c], out[..., c:]
    mse = jnp.mean((noise - eps) ** 2, axis=(1, 2, 3))
    # The bound trains only the variance: the mean goes in frozen.
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], -1)
    pmv = diffusion.p_mean_variance(frozen, x_t, t)
    true_mean, _, true_logvar = diffusion.q_posterior_mean_variance(x0, x_t, t)
    kl = jnp.mean(normal_kl(true_mean, true_logvar, pmv["mean"], pmv["log_variance"]), axis=(1, 2, 3)) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, pmv["mean"], 0.5 * pmv["log_variance"]),
                    axis=(1, 2, 3)) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    loss = jnp.mean(mse + vb)
    return loss, dict(mse=jnp.mean(mse), vb=jnp.mean(vb))
