"""U-ViT's training objective (the original `train_ldm_discrete.py`'s `LSimple`).

A timestep n is drawn uniformly from 1..N of the discrete VP schedule the
U-ViT samplers use (the Stable-Diffusion betas by default), the data noised
as `sqrt(ac[n]) x0 + sqrt(1 - ac[n]) eps`, and the network, told time n,
predicts eps: the loss is the mean of squares of the error. Labels are
dropped to the null class with probability `label_dropout` for
classifier-free guidance. The noising is the router trainer's
(`DiscreteVPSchedule.discrete_alphas_cumprod`), so a U-ViT trained here and
its routers see the same process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2c_jax.diffusion.vp import DiscreteVPSchedule


def uvit_training_loss(params, model_apply, schedule: DiscreteVPSchedule, x0, y, key, *, null_class,
                       label_dropout: float = 0.1):
    """Per-batch mean loss and its parts. model_apply(params, x, t, y) -> NHWC eps (t: float times 1..N)."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    b = x0.shape[0]
    n = jax.random.randint(k_t, (b,), 1, schedule.total_N + 1)
    ac = jnp.asarray(schedule.discrete_alphas_cumprod(), jnp.float32)[n][:, None, None, None]
    noise = jax.random.normal(k_noise, x0.shape)
    x_n = jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise
    if y is not None and null_class is not None:
        y = jnp.where(jax.random.uniform(k_drop, (b,)) < label_dropout, null_class, y)
    eps = model_apply(params, x_n, n.astype(jnp.float32), y)
    mse = jnp.mean((noise - eps) ** 2, axis=(1, 2, 3))
    loss = jnp.mean(mse)
    return loss, dict(mse=loss)
