"""The router-training losses of the original, as pure functions of the router.

Only `prob` (steps, 2*blocks) is differentiated; the model parameters enter as
constants, so the diffusion model stays frozen by construction.

DiT + DDIM (the original's `router_training_losses`): noise x0 to the full
step `t_index` (odd respaced index), take one full DDIM step to `t_index-1`,
which fills the cache, then at `t_index-1` compare the full model output with
the router-interpolated one (`beta*computed + (1-beta)*cached`, beta =
sigmoid(prob[t_index-1])): per-sample mean squared error over all channels,
plus `l1_weight * sum(beta)` of that row.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def router_weights(prob_row, ste_threshold: Optional[float] = None):
    """(weights used in the interpolation, scores for the L1 term).

    With `ste_threshold`, the forward pass uses the hard mask `scores > thr`
    and the gradient passes straight through to the scores.
    """
    scores = jax.nn.sigmoid(prob_row)
    if ste_threshold is None:
        return scores, scores
    hard = (scores > ste_threshold).astype(scores.dtype)
    return scores + jax.lax.stop_gradient(hard - scores), scores


def dit_router_loss(prob, params, batch, *, model, diffusion, l1_weight: float,
                    ste_threshold: Optional[float] = None):
    """Returns (loss, aux). batch: x0 (B,H,W,C) latents, y (B,) labels already dropped
    to the null class where needed, noise (B,H,W,C), t_index () odd respaced index."""
    x0, y, noise, t_index = batch["x0"], batch["y"], batch["noise"], batch["t_index"]
    b = x0.shape[0]
    tmap = jnp.asarray(diffusion.timestep_map, jnp.int32)

    # One full DDIM step, as sampling would take it; nothing here depends on prob.
    x_t = diffusion.q_sample(x0, t_index, noise)
    out, cache = model.apply(params, x_t, jnp.broadcast_to(tmap[t_index], (b,)), y)
    x_next = diffusion.ddim_step(out, x_t, t_index)
    cache = jax.lax.stop_gradient(cache)
    x_next = jax.lax.stop_gradient(x_next)

    t_next = jnp.broadcast_to(tmap[t_index - 1], (b,))
    target, _ = model.apply(params, x_next, t_next, y)
    weights, scores = router_weights(prob[t_index - 1], ste_threshold)
    pred, _ = model.apply(params, x_next, t_next, y, cache=cache, beta=weights)

    mse = jnp.mean((jax.lax.stop_gradient(target) - pred) ** 2, axis=(1, 2, 3))
    l1 = jnp.sum(scores)
    data_loss = jnp.mean(mse)
    loss = data_loss + l1_weight * l1
    return loss, dict(data_loss=data_loss, l1=l1, mse=mse)


def dit_random_batch(key, x0, y, *, steps: int, null_class: int, label_dropout: float = 0.1):
    """The original's random draws for one DiT loss: a random odd full step for the
    whole batch, Gaussian noise, and label dropout to the null class."""
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t_index = jax.random.randint(k_t, (), 0, steps // 2) * 2 + 1
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    drop = jax.random.uniform(k_drop, y.shape) < label_dropout
    return dict(x0=x0, y=jnp.where(drop, null_class, y), noise=noise, t_index=t_index.astype(jnp.int32))
