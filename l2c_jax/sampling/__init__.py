"""`l2c_jax.sample`: sampling with (or without) the learned layer cache, or any caching method's schedule.

Samplers are built once per model and kept on it (`Model.samplers`), keyed by
what changes their graphs: family, solver, steps, strategy, whether guidance
is on, and the sampler's options. Shapes and cache masks are keyed inside a
sampler (one compiled step per distinct mask and shape); the guidance scale is
an argument of the compiled steps. A second identical call, or one that only
changes `cfg_scale`, compiles nothing. The samplers live as long as the model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from l2c_jax import compile_cache
from l2c_jax.errors import ConfigError, finite_number
from l2c_jax.sampling.base import STRATEGIES, computed_share, resolve_strategy
from l2c_jax.sampling.dit import DiTSampler
from l2c_jax.sampling.uvit import UViTSampler
from l2c_jax.schedule import Schedule, from_router, parse_spec

__all__ = ["DiTSampler", "UViTSampler", "STRATEGIES", "Schedule", "computed_share", "resolve_strategy", "sample",
           "sampler_for", "resolve_schedule", "router_masks", "as_router", "is_guided", "sampler_class"]

# Each family's sampler, by the family name a model carries (a plain table: nothing registers).
SAMPLERS = {cls.family: cls for cls in (DiTSampler, UViTSampler)}
ROUTER_KINDS = {name: cls.router_kind for name, cls in SAMPLERS.items()}


def sampler_class(family: str):
    if family not in SAMPLERS:
        raise ConfigError(f"no sampler for model family {family!r} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[family]


def router_masks(model, router, threshold, steps: int):
    """The router's per-step masks after checking it belongs to this model and step count
    (`l2c_jax.schedule.from_router`, which also carries its forecast and anchors)."""
    return _router_schedule(model, router, threshold, steps).masks


def _router_kind(model) -> str:
    want = ROUTER_KINDS.get(model.family)
    if want is None:
        raise ConfigError(f"no router kind for model family {model.family!r}")
    return want


def _router_schedule(model, router, threshold, rows: int, retarget: bool = False,
                     skip_type: str = "time_uniform") -> Schedule:
    return from_router(as_router(router, model), kind=_router_kind(model), num_units=model.num_units, rows=rows,
                       threshold=threshold, retarget=retarget, skip_type=skip_type)


def resolve_schedule(model, sampler, schedule=None, *, router=None, threshold: Optional[float] = None, masks=None,
                     forecast: Optional[str] = None, retarget: bool = False, routers=None, calibration=None,
                     skip_type: str = "time_uniform") -> Schedule:
    """The one path from what a caller gave to the `Schedule` a sampler runs.

    schedule: a `Schedule`, or a caching method by name and setting ("l2c",
    "l2c:0.3", "l2c:k4_taylor2", "fora:3", "taylorseer:3/2", "fewer_steps:10",
    ...; `l2c_jax.methods`), whose "l2c" reads `router`, and "l2c:NAME[@T]" the
    router `routers[NAME]` or the router file NAME;
    router: a path or `Router`, thresholded at `threshold` (default: its own),
    retargeted to the sampler's step count when `retarget`; masks: a user's own
    (rows, units) bools. At most one of the three; none: every unit computes.
    forecast: overrides how reused units are formed ("copy", "taylor1",
    "taylor2"); by default a router's own, TaylorSeer's, or copies.
    calibration: {num_samples, seed} of the full trajectories SmoothCache and
    the error ranking calibrate on (default 64 images, seed 1000), and
    search_samples, the images an anchor search ("taylorseer:search10/2")
    compares with the full sampler's (default 256, same seed).
    A `fewer_steps` schedule runs another step count (`Schedule.steps`): sample
    it with a sampler of that many steps.
    """
    from l2c_jax.methods import Context, make_schedule, schedule_error, unit_changes

    given = [n for n, v in (("schedule", schedule), ("router", router), ("masks", masks)) if v is not None
             and not (n == "router" and isinstance(schedule, str))]
    if len(given) > 1:
        raise ConfigError(f"pass one of schedule, router or masks, not {' and '.join(given)}")
    if threshold is not None and router is None and not isinstance(schedule, str):
        raise ConfigError("threshold applies to a router; none was given")
    rows = sampler.rows
    named = dict(routers or {})

    def router_schedule(name, thr):
        r = router if not name else named.get(name) or (name if os.path.exists(name) else None)
        if r is None:
            raise ConfigError(f"schedule needs a router{' named ' + repr(name) if name else ''}: pass router= "
                              f"(--config.router.checkpoint){' or routers=' if name else ''}")
        routed = _router_schedule(model, r, threshold if thr is None else thr, rows, retarget, skip_type)
        return dataclasses.replace(routed, masks=sampler.check_router_masks(routed.masks))

    if isinstance(schedule, Schedule):
        result = schedule
    elif isinstance(schedule, str):
        name, setting = parse_spec(schedule)
        if model.family != "dit" and name == "taylorseer":
            raise ConfigError(f"taylorseer forecasts; a {model.family} model samples cached units as copies for now "
                              "(every other caching method applies)")
        cal = {"num_samples": 64, "seed": 1000, **dict(calibration or {})}

        def calibration_noise(n):
            from l2c_jax.sampling.draws import sample_noise

            cfg = model.config
            noise = sample_noise(int(cal["seed"]), np.arange(n), (cfg.input_size, cfg.input_size, cfg.in_channels))
            return noise, calibration_labels(cfg, n)

        def changes():
            return unit_changes(sampler, *calibration_noise(int(cal["num_samples"])))

        ctx = Context(num_units=model.num_units, steps=rows, router_schedule=router_schedule,
                      changes=functools.lru_cache(maxsize=1)(changes),
                      error=schedule_error(sampler, *calibration_noise(int(cal.get("search_samples", 256)))))
        result = make_schedule(ctx, name, setting)
    elif router is not None:
        result = router_schedule("", None)
    elif masks is not None:
        result = Schedule(masks=np.asarray(masks, bool), num_units=model.num_units)
    else:
        result = Schedule(method="full", steps=rows, num_units=model.num_units)
    if forecast is not None:
        result = dataclasses.replace(result, forecast=forecast)
    return result


def calibration_labels(cfg, n: int):
    """Labels 0, 1, ... cycling over the model's classes (the null class never), None for an unconditional model."""
    return np.arange(n) % cfg.num_labels if cfg.num_labels else None


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
    if cfg_scale is None:
        return False
    scale = finite_number("cfg_scale", cfg_scale)  # a NaN or inf scale samples NaN images with exit 0
    return scale != sampler_class(family).guidance_off


def sampler_for(model, solver: str, steps: int, guided: bool, strategy: str = "static", **kw):
    """The model's sampler for this graph-changing key, built on first use and then kept on the model."""
    cls = sampler_class(model.family)
    if solver not in cls.solvers:
        raise ConfigError(f"{model.family} samples with {' | '.join(map(repr, cls.solvers))}, not {solver!r}")
    if "cache_dtype" in kw and kw["cache_dtype"] is not None:
        kw["cache_dtype"] = jnp.dtype(kw["cache_dtype"]).name
    strategy = "auto" if strategy in (None, "", "auto") else resolve_strategy(strategy)
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
           strategy: str = "static", schedule=None, **kw):
    """Samples latents (API.md). With a router, the original's cache schedule applies.

    DiT: solver "ddim" | "ddpm", `steps` sampler steps, CFG as `forward_with_cfg`
    (None or 1.0 = no guidance). U-ViT: solver "dpm_solver2" (also dpm_solver1/3,
    dpm_solver2m), `steps` = NFE per branch, CFG `cond + s*(cond - uncond)`.
    router: a path (released .pt/.pth or the project's format) or a `Router`,
    thresholded at `threshold` (default: the router's own); a router trained
    with forecasts samples with them.
    masks: instead of a router, a schedule of your own: (model evaluations,
    2*num_blocks) bools in sampling order (DiT DDIM: `steps` rows; U-ViT
    DPM-Solver-2: NFE rows, cond and uncond of one evaluation share a row).
    schedule: instead, any caching method by name and setting ("taylorseer:3/2",
    "fora:3", "l2c:0.3", ... `l2c_jax.methods`; "l2c" reads `router`) or a
    `l2c_jax.schedule.Schedule` (`resolve_schedule` says how each becomes one).
    strategy: "static" (one graph per distinct mask), "cond" (one graph with each
    sub-layer behind lax.cond), or "auto" (the backend's measured default).
    kw: sampler options (DiT: eta, guidance_channels, respacing, cache_dtype,
    history_dtype, ...; U-ViT: skip_type, batch_cfg, cache_dtype, ...), and
    `forecast` (overrides the schedule's), `retarget` (a router of another step
    count, interpolated), `routers` (name -> router, for "l2c:NAME"). key:
    DiT's DDPM / eta > 0 noise (DPM-Solver draws none).
    """
    forecast = kw.pop("forecast", None)
    routers = kw.pop("routers", None)
    retarget = bool(kw.pop("retarget", False))
    if router is not None and masks is not None:
        raise ConfigError("pass a router or masks, not both")
    compile_cache.ensure_enabled()
    guided = is_guided(model.family, cfg_scale)
    sampler = sampler_for(model, solver, steps, guided, strategy, **kw)
    if router is not None and schedule is None:
        router = as_router(router, model)
    sched = resolve_schedule(model, sampler, schedule, router=router, threshold=threshold, masks=masks,
                             forecast=forecast, routers=routers, retarget=retarget,
                             skip_type=kw.get("skip_type", "time_uniform"))
    if sched.steps is not None and int(sched.steps) != sampler.rows:  # fewer_steps: a sampler of its own
        sampler = sampler_for(model, solver, int(sched.steps), guided, strategy, **kw)
    return sampler(noise, y, sched, key=key, progress=progress, cfg_scale=cfg_scale if guided else None)
