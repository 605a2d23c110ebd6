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
from l2c_jax.sampling.base import STRATEGIES, computed_share, resolve_strategy
from l2c_jax.sampling.dit import DiTSampler
from l2c_jax.sampling.uvit import UViTSampler

__all__ = ["DiTSampler", "UViTSampler", "STRATEGIES", "computed_share", "resolve_strategy", "sample", "sampler_for",
           "router_masks", "as_router", "is_guided", "sampler_class"]

# Each family's sampler, by the family name a model carries (a plain table: nothing registers).
SAMPLERS = {cls.family: cls for cls in (DiTSampler, UViTSampler)}
ROUTER_KINDS = {name: cls.router_kind for name, cls in SAMPLERS.items()}


def sampler_class(family: str):
    if family not in SAMPLERS:
        raise ConfigError(f"no sampler for model family {family!r} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[family]


def router_masks(model, router, threshold, steps: int):
    """The router's per-step masks after checking it belongs to this model and step count."""
    want = ROUTER_KINDS.get(model.family)
    if router.kind != want:
        raise ConfigError(f"a {router.kind} router cannot drive a {model.family} model (needs {want})")
    if router.num_units != model.num_units:
        raise ConfigError(f"router has {router.num_units} columns, the model has {model.num_units} sub-layers")
    if router.steps != steps:
        raise ConfigError(f"router was trained for {router.steps} steps, sampling uses {steps} (retarget it: "
                          f"--config.router.retarget=True, or convert/router.py --steps {steps})")
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
    return cfg_scale is not None and float(cfg_scale) != sampler_class(family).guidance_off


def sampler_for(model, solver: str, steps: int, guided: bool, strategy: str = "static", **kw):
    """The model's sampler for this graph-changing key, built on first use and then kept on the model."""
    cls = sampler_class(model.family)
    if solver not in cls.solvers:
        raise ConfigError(f"{model.family} samples with {' | '.join(map(repr, cls.solvers))}, not {solver!r}")
    if "cache_dtype" in kw and kw["cache_dtype"] is not None:
        kw["cache_dtype"] = jnp.dtype(kw["cache_dtype"]).name
    strategy = resolve_strategy(strategy)
    samplers = getattr(model, "samplers", None)
    if samplers is None:  # a Model look-alike without the cache: build every time
        samplers = {}
    key = (model.family, solver, int(steps), strategy, bool(guided), _hashable(kw))
    if key not in samplers:
        # The scale given at build time only marks guidance on (any value but the identity); each call passes its own.
        samplers[key] = cls(model, int(steps), solver=solver, cfg_scale=cls.guidance_off + 1.0 if guided else None,
                            strategy=strategy, **kw)
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
    strategy: "static" (one graph per distinct mask), "cond" (one graph with each
    sub-layer behind lax.cond), or "auto" (the backend's measured default).
    kw: sampler options (DiT: eta, guidance_channels, respacing, cache_dtype, ...;
    U-ViT: skip_type, batch_cfg, cache_dtype, ...). key: DiT's DDPM / eta > 0 noise (DPM-Solver draws none).
    """
    if router is not None and masks is not None:
        raise ConfigError("pass a router or masks, not both")
    if threshold is not None and router is None:
        raise ConfigError("threshold applies to a router; none was given")
    compile_cache.ensure_enabled()
    guided = is_guided(model.family, cfg_scale)
    sampler = sampler_for(model, solver, steps, guided, strategy, **kw)
    extra = {}
    if router is not None:
        router = as_router(router, model)
        masks = router_masks(model, router, threshold, sampler.rows)
        if router.forecast != "copy":  # a router trained with forecasts samples with them
            extra["forecast"] = router.forecast
    return sampler(noise, y, masks, key=key, progress=progress, cfg_scale=cfg_scale if guided else None, **extra)
