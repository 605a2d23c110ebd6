"""`l2c_jax.sample`: sampling with (or without) the learned layer cache.

Samplers are built once per model and kept on it (`Model.samplers`), keyed by
what changes their graphs: family, solver, steps, strategy, whether guidance
is on, and the sampler's options. Shapes and cache masks are keyed inside a
sampler (one compiled step per distinct mask and shape); the guidance scale is
an argument of the compiled steps. A second identical call, or one that only
changes `cfg_scale`, compiles nothing. The samplers live as long as the model.
"""

from __future__ import annotations

import os
from typing import Optional

import jax.numpy as jnp

from l2c_jax import compile_cache
from l2c_jax.errors import ConfigError
from l2c_jax.sampling.dit import DiTSampler, computed_share  # noqa: F401  (public names)
from l2c_jax.sampling.strategies import default_strategy, make_sampler
from l2c_jax.sampling.uvit import UViTSampler


ROUTER_KINDS = {"dit": "dit-ddim", "uvit": "uvit-dpm2"}


def router_masks(model, router, threshold, steps: int):
    """The router's per-step masks after checking it belongs to this model and step count."""
    want = ROUTER_KINDS.get(model.family)
    if router.kind != want:
        raise ConfigError(f"a {router.kind} router cannot drive a {model.family} model (needs {want})")
    if router.num_units != model.num_units:
        raise ConfigError(f"router has {router.num_units} columns, the model has {model.num_units} sub-layers")
    if router.steps != steps:
        raise ConfigError(f"router was trained for {router.steps} steps, sampling uses {steps}")
    if threshold is None:
        threshold = router.threshold
    if threshold is None:
        raise ConfigError("a router needs a threshold (the released DiT routers use 0.1, U-ViT 0.9)")
    return router.masks(threshold)


def as_router(router, model=None):
    """A `Router` from a Router or a path (released .pt/.pth or the project's format)."""
    if isinstance(router, (str, os.PathLike)):
        from l2c_jax.router import load_router

        kind = ROUTER_KINDS.get(model.family) if model is not None else None
        return load_router(os.fspath(router), kind=kind)
    if not hasattr(router, "masks") or not hasattr(router, "kind"):
        raise ConfigError(f"router must be a path or a l2c_jax.Router, got {type(router).__name__}")
    return router


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def is_guided(family: str, cfg_scale) -> bool:
    # DiT's forward_with_cfg is the identity at scale 1; U-ViT's cond + s*(cond - uncond) at scale 0.
    return cfg_scale is not None and float(cfg_scale) != (1.0 if family == "dit" else 0.0)


def sampler_for(model, solver: str, steps: int, guided: bool, strategy: str = "static", **kw):
    """The model's sampler for this graph-changing key, built on first use and then kept on the model."""
    if "cache_dtype" in kw and kw["cache_dtype"] is not None:
        kw["cache_dtype"] = jnp.dtype(kw["cache_dtype"]).name
    if model.family == "dit":
        if solver not in ("ddim", "ddpm"):
            raise ConfigError(f"DiT samples with 'ddim' or 'ddpm', not {solver!r}")
        strategy = default_strategy() if strategy == "auto" else strategy
    elif model.family == "uvit":
        if strategy not in ("static", "auto"):
            raise ConfigError(f"U-ViT samples with the static strategy only, not {strategy!r}")
        strategy = "static"
    else:
        raise ConfigError(f"no sampler for model family {model.family!r}")
    samplers = getattr(model, "samplers", None)
    if samplers is None:  # a Model look-alike without the cache: build every time
        samplers = {}
    key = (model.family, solver, int(steps), strategy, bool(guided), _hashable(kw))
    if key not in samplers:
        # The scale given at build time only marks guidance on; each call passes its own.
        if model.family == "dit":
            samplers[key] = make_sampler(model, int(steps), strategy, solver=solver,
                                         cfg_scale=4.0 if guided else None, **kw)
        else:
            samplers[key] = UViTSampler(model, int(steps), cfg_scale=1.0 if guided else None, solver=solver, **kw)
    return samplers[key]


def sample(model, noise, y, solver: str = "ddim", steps: int = 50, cfg_scale: Optional[float] = None,
           router=None, threshold: Optional[float] = None, masks=None, key=None, progress: bool = False,
           strategy: str = "static", **kw):
    """Samples latents (API.md). With a router, the original's cache schedule applies.

    DiT: solver "ddim" | "ddpm", `steps` sampler steps, CFG as `forward_with_cfg`
    (None or 1.0 = no guidance). U-ViT: solver "dpm_solver2" (also dpm_solver1/3,
    dpm_solver2m), `steps` = NFE per branch, CFG `cond + s*(cond - uncond)`.
    router: a path (released .pt/.pth or the project's format) or a `Router`,
    thresholded at `threshold` (default: the router's own).
    masks: instead of a router, a schedule of your own: (model evaluations,
    2*num_blocks) bools in sampling order (DiT DDIM: `steps` rows; U-ViT
    DPM-Solver-2: NFE rows, cond and uncond of one evaluation share a row).
    strategy (DiT): "static" (one graph per distinct mask), "cond" / "scan" (one graph
    with each sub-layer behind lax.cond), or "auto" (the backend's measured default).
    kw: sampler options (DiT: eta, guidance_channels, respacing, cache_dtype, ...;
    U-ViT: skip_type, batch_cfg, cache_dtype, ...). key: DiT's DDPM / eta > 0 noise; U-ViT ignores it.
    """
    if router is not None and masks is not None:
        raise ConfigError("pass a router or masks, not both")
    if threshold is not None and router is None:
        raise ConfigError("threshold applies to a router; none was given")
    compile_cache.ensure_enabled()
    guided = is_guided(model.family, cfg_scale)
    sampler = sampler_for(model, solver, steps, guided, strategy, **kw)
    if router is not None:
        rows = sampler.steps if model.family == "dit" else sampler.nfe
        masks = router_masks(model, as_router(router, model), threshold, rows)
    scale = cfg_scale if guided else None
    if model.family == "dit":
        return sampler(noise, y, masks, key=key, progress=progress, cfg_scale=scale)
    # U-ViT's DPM-Solver is deterministic: a key is accepted and unused, as it always was.
    return sampler(noise, y, masks=masks, progress=progress, cfg_scale=scale)
