"""DiT's classifier-free guidance (`forward_with_cfg` of the original), for any forward with the cache contract."""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from l2c_jax.errors import ConfigError


def forward_with_cfg(apply: Callable, in_channels: int, params, x, t, y, cfg_scale, cache=None, mask=None,
                     beta=None, guidance_channels: Optional[int] = 3):
    """`apply(params, x, t, y, cache, mask, beta) -> (out, cache)` run on the batch [cond | uncond].

    The first half of x is used for both halves. Guidance is applied to the
    first `guidance_channels` output channels (3, the original's choice "for
    exact reproducibility"); None guides all `in_channels` channels of eps,
    the standard formulation.
    """
    n = x.shape[0]
    if n % 2:
        raise ConfigError(f"classifier-free guidance needs an even batch [cond | uncond], got {n}")
    half = x[: n // 2]
    out, cache = apply(params, jnp.concatenate([half, half], 0), t, y, cache, mask, beta)
    gc = in_channels if guidance_channels is None else guidance_channels
    eps, rest = out[..., :gc], out[..., gc:]
    cond, uncond = eps[: n // 2], eps[n // 2:]
    half_eps = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([half_eps, half_eps], 0), rest], -1), cache
