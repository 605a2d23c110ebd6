"""`l2c_jax.sample`: sampling with (or without) the learned layer cache."""

from __future__ import annotations

from typing import Optional

from l2c_jax.errors import ConfigError
from l2c_jax.sampling.dit import DiTSampler, computed_share  # noqa: F401


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


def sample(model, noise, y, solver: str = "ddim", steps: int = 50, cfg_scale: Optional[float] = None,
           router=None, threshold: Optional[float] = None, key=None, progress: bool = False,
           strategy: str = "static", **kw):
    """Samples latents (API.md). With a router, the original's cache schedule applies.

    DiT: solver "ddim" | "ddpm", `steps` sampler steps, CFG as `forward_with_cfg`
    (None or 1.0 = no guidance). U-ViT: solver "dpm_solver2" (also dpm_solver1/3,
    dpm_solver2m), `steps` = NFE per branch, CFG `cond + s*(cond - uncond)`.
    strategy (DiT): "static" (one graph per distinct mask), "cond" / "scan" (one graph
    with each sub-layer behind lax.cond), or "auto" (the backend's measured default).
    """
    masks = router_masks(model, router, threshold, steps) if router is not None else None
    if model.family == "dit":
        if solver not in ("ddim", "ddpm"):
            raise ConfigError(f"DiT samples with 'ddim' or 'ddpm', not {solver!r}")
        if strategy == "static":
            sampler = DiTSampler(model, steps, solver, cfg_scale, **kw)
        else:  # "cond" / "scan": one graph for every schedule (BENCHMARKS.md); "auto": the backend's default
            from l2c_jax.models.dit_scan import default_strategy, make_sampler  # lazy: avoids an import cycle
            sampler = make_sampler(model, steps, default_strategy() if strategy == "auto" else strategy,
                                   solver=solver, cfg_scale=cfg_scale, **kw)
        return sampler(noise, y, masks, key=key, progress=progress)
    if model.family == "uvit":
        from l2c_jax.sampling.uvit import sample_uvit
        return sample_uvit(model, noise, y, steps, cfg_scale, masks=masks, solver=solver, progress=progress, **kw)
    raise ConfigError(f"no sampler for model family {model.family!r}")
