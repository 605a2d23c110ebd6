"""U-ViT sampling with the learned cache: DPM-Solver over the discrete VP schedule.

What the original (`U-ViT/sample_ldm_discrete.py` with `libs/uvit_dynamic.py`)
does, and this module reproduces:

- DPM-Solver++ singlestep of order 2 (`predict_x0=True`), time-uniform steps
  from t = 1 to 1/N, the Stable-Diffusion betas; `steps` is the NFE, so NFE
  20 is 10 solver steps. The network is called with time `t * N`.
- Classifier-free guidance `cond + scale * (cond - uncond)`, the
  unconditional branch labelled with the null class (`num_classes - 1`);
  no guidance for scale 0 / None or an unconditional model.
- The cache: the LAST model evaluation of solver step k (for order 2 its
  midpoint evaluation) fills the cache, and the FIRST evaluation of step k+1
  reuses it with that step's mask (`Router.masks(threshold)[k+1]`, the
  router row of the step's start time). All other evaluations, and step 0,
  are full. Conditional and unconditional branches keep their own cache.

A schedule can also be given per model evaluation (NFE rows, in evaluation
order, `evaluation_masks`): evaluation e reuses what evaluation e-1 left in
the cache. A router's per-step schedule expands to that form (its rows at the
first evaluation of each solver step, every other evaluation full), which is
exactly the rule above.

The solver loop and its arithmetic stay in Python (a few small ops per
step); every model evaluation is one call of a jitted function. With the
"static" strategy its cache mask is static: each distinct mask compiles once,
shared by every step that uses it, and a reused sub-layer is absent from that
program; with "cond" one program takes the mask as an array
(`l2c_jax.sampling.base`). The cache is an explicit pytree
carried between evaluations, returned only when the next step reuses it. By
default the conditional and unconditional branches run as one batch
[cond | uncond] (each sample's cache rows are its own, so the branches keep
separate caches); `batch_cfg=False` runs them as two calls like the original.
The guidance scale is an argument of the compiled evaluation (changing it
compiles nothing); the carried cache is donated to the evaluation that reuses
it and may be kept in a narrower `cache_dtype`.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.diffusion.dpm_solver import DPMSolver
from l2c_jax.diffusion.vp import DiscreteVPSchedule
from l2c_jax.errors import ConfigError
from l2c_jax.models.cache import check_mask
from l2c_jax.sampling.base import Sampler, abstract, call_scale, cast_cache
from l2c_jax.schedule import Schedule

# solver name -> (method, order)
SOLVERS = {
    "dpm_solver1": ("singlestep", 1),
    "dpm_solver2": ("singlestep", 2),
    "dpm_solver3": ("singlestep", 3),
    "dpm_solver2m": ("multistep", 2),  # DPM-Solver++(2M)
}


def parse_solver(solver: str):
    """`"dpm_solver2"` -> ("singlestep", 2); see `SOLVERS`."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown U-ViT solver {solver!r} (known: {', '.join(SOLVERS)})")
    return SOLVERS[solver]


class UViTSampler(Sampler):
    """Samples latents from a U-ViT `Model` with DPM-Solver (data prediction).

    steps: NFE, model evaluations per sample and branch (the released routers'
    dpm20 / dpm50). solver: a `SOLVERS` name; the original and its routers use
    "dpm_solver2" (NFE // 2 solver steps). cfg_scale: guidance scale of
    `cond + s * (cond - uncond)`; None or 0 disables it. skip_type:
    "time_uniform" (the original), "logSNR" or "time_quadratic". schedule:
    a `DiscreteVPSchedule`, by default the Stable-Diffusion betas.
    t_start / t_end: the time range, by default 1 and 1/N. strategy: "static"
    (a program per distinct mask), "cond" (one program) or "auto".
    """

    family = "uvit"
    router_kind = "uvit-dpm2"
    # Jobs compile each evaluation's program on first use, handing the heap back after each: compiling the
    # 11 programs of U-ViT-H/2's NFE-20 schedule ahead raised sample.py's peak from 4.23 to 4.52 GiB.
    compile_ahead = False
    solvers = tuple(SOLVERS)
    default_solver = "dpm_solver2"
    rows_prefix, rows_label = "dpm", "NFE"
    step_multiple = 2  # DPM-Solver-2, the routers' solver: a start and a midpoint
    guidance_off = 0.0

    def __init__(self, model, steps: int, cfg_scale: Optional[float] = None, solver: str = "dpm_solver2",
                 skip_type: str = "time_uniform", schedule: Optional[DiscreteVPSchedule] = None,
                 t_start: Optional[float] = None, t_end: Optional[float] = None, batch_cfg: bool = True,
                 solver_type: str = "dpm_solver", cache_dtype=None, strategy: str = "static"):
        if model.family != "uvit":
            raise ConfigError(f"UViTSampler needs a U-ViT model, got {model.family}")
        self.model = model.on_devices()
        self.method, self.order = parse_solver(solver)
        self.schedule = schedule if schedule is not None else DiscreteVPSchedule.stable_diffusion()
        self.solver = DPMSolver(self.schedule, predict_x0=True, solver_type=solver_type)
        self.nfe = int(steps)
        self.plan = self.solver.plan(self.nfe, self.order, self.method, skip_type, t_start, t_end)
        cfg = model.config
        scale = None if cfg_scale is None or float(cfg_scale) == 0.0 else float(cfg_scale)
        if scale is not None and not cfg.conditional:
            raise ConfigError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs a class-conditional "
                              "U-ViT; this one is unconditional")
        self.cfg_scale = scale
        self.batch_cfg = bool(batch_cfg)
        self._init_steps(strategy, cache_dtype)

    @property
    def rows(self) -> int:
        """Rows of this sampler's routers: the NFE (the released dpm20 / dpm50 layout)."""
        return self.nfe

    @classmethod
    def options_from_config(cls, sc) -> dict:
        return dict(skip_type=sc.get("skip_type", "time_uniform"), batch_cfg=sc.get("batch_cfg", True))

    def describe(self) -> tuple:
        name = next(k for k, v in SOLVERS.items() if v == (self.method, self.order))
        return (f"NFE {self.nfe} {name.upper()} ({self.num_steps} steps)",
                f"{self.nfe} evaluations x {self.model.num_units}")

    def check_router_masks(self, masks):
        """A router's masks (one row per solver step: its first evaluation) checked and expanded to one row per
        model evaluation, every other evaluation full (`evaluation_masks`), as methods' schedules are."""
        if masks is not None and masks.shape[0] != self.num_steps:
            raise ConfigError(f"the router's masks cover {masks.shape[0]} solver steps, NFE {self.nfe} with this "
                              f"solver takes {self.num_steps}; uvit-dpm2 routers are for dpm_solver2")
        return None if masks is None else self.evaluation_masks(masks)

    @property
    def num_steps(self) -> int:
        """Solver steps: rows of the cache masks."""
        return len(self.plan)

    def timesteps(self) -> np.ndarray:
        """(num_steps + 1,) float32 continuous times the steps run between."""
        return np.array([st.s for st in self.plan] + [self.plan[-1].t], dtype=np.float32)

    # ------------------------------------------------------------------ one guided evaluation
    def _eval(self, params, x, t, y, cache, cfg_scale, mask_arr, *, mask, keep_cache, record):
        """Guided noise prediction at continuous time t (scalar), the new cache if kept, the calls if recorded."""
        mask = mask_arr if mask_arr is not None else mask
        b = x.shape[0]
        tm = jnp.broadcast_to(self.schedule.model_time(t), (b,))
        cache = cast_cache(cache, self.model.dtype if self.cache_dtype is not None else None)
        if cfg_scale is None:
            out, new_cache = self.model.apply(params, x, tm, y, cache, mask)
            calls = ((x, tm, y, out),)
            eps = out
        else:
            null = jnp.full_like(y, self.model.config.null_class)
            if self.batch_cfg:
                out, new_cache = self.model.apply(params, jnp.concatenate([x, x], 0), jnp.concatenate([tm, tm], 0),
                                                  jnp.concatenate([y, null], 0), cache, mask)
                cond, uncond = out[:b], out[b:]
            else:
                cache_c, cache_u = (None, None) if cache is None else cache
                cond, new_c = self.model.apply(params, x, tm, y, cache_c, mask)
                uncond, new_u = self.model.apply(params, x, tm, null, cache_u, mask)
                new_cache = (new_c, new_u)
            calls = ((x, tm, y, cond), (x, tm, null, uncond))
            eps = cond + cfg_scale * (cond - uncond)
        return eps, (cast_cache(new_cache, self.cache_dtype) if keep_cache else None), (calls if record else None)

    def _plan(self, schedule, record: bool = False, carry: bool = False) -> list:
        # static: (mask, keep the cache for the next evaluation, a cache comes in, record); cond: one program.
        # carry: every evaluation returns its units (on_step reads each value).
        if self.strategy == "cond":
            return [("cond", True, True, record)] * len(schedule)
        keys = []
        for e, m in enumerate(schedule):
            keep = carry or (e + 1 < len(schedule) and schedule[e + 1] is not None)
            keys.append((m, keep, m is not None, record))
        return keys

    def _build(self, key):
        mask, keep, _, record = key
        # An evaluation that passes the cache on takes over the incoming cache's buffers.
        return jax.jit(functools.partial(self._eval, mask=None if mask == "cond" else mask, keep_cache=keep,
                                         record=record), donate_argnums=(4,) if keep else ())

    def _rows(self, x) -> int:
        return int(x.shape[0])

    def _cache(self, batch: int, abstract_only: bool = False):
        """The carried cache of "cond" (zeros before the first evaluation), or its shapes."""
        cfg = self.model.config
        two = self.cfg_scale is not None
        rows = batch * (2 if two and self.batch_cfg else 1)
        shape = (rows, cfg.extras + cfg.num_patches, cfg.embed_dim)
        dtype = self.cache_dtype or self.model.dtype
        make = (lambda: jax.ShapeDtypeStruct(shape, dtype)) if abstract_only else (lambda: jnp.zeros(shape, dtype))
        one = lambda: tuple(make() for _ in range(cfg.num_units))  # noqa: E731
        return (one(), one()) if two and not self.batch_cfg else one()

    def _lower(self, key, batch: int):
        cfg = self.model.config
        x = jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32)
        y = jax.ShapeDtypeStruct((batch,), jnp.int32) if cfg.conditional else None
        cache = self._cache(batch, abstract_only=True) if key[2] else None
        scale = None if self.cfg_scale is None else jax.ShapeDtypeStruct((), jnp.float32)
        mask_arr = jax.ShapeDtypeStruct((cfg.num_units,), jnp.bool_) if key[0] == "cond" else None
        return self.function(key).lower(abstract(self.model.params), x, jax.ShapeDtypeStruct((), jnp.float32), y,
                                        cache, scale, mask_arr)

    def evaluation_masks(self, masks=None) -> np.ndarray:
        """The schedule as (NFE, 2*num_blocks) bools, one row per model evaluation in order.

        masks: None (all True), NFE rows (already per evaluation), or one row per
        solver step (`num_steps` rows, the router form: row k is the mask of the
        first evaluation of step k, every other evaluation computes all). Where
        the two counts coincide (one evaluation per step) both readings agree.
        """
        n, units = self.nfe, self.model.num_units
        masks = _masks_of(masks)
        if masks is None:
            return np.ones((n, units), bool)
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != units or masks.shape[0] not in (n, self.num_steps):
            raise ConfigError(f"cache masks have shape {masks.shape}, the sampler needs ({n}, {units}) "
                              f"(model evaluations, sub-layers) or ({self.num_steps}, {units}) (solver steps)")
        if masks.shape[0] == n:
            return masks
        out = np.ones((n, units), bool)
        out[self._first_evaluations()] = masks
        return out

    def _first_evaluations(self) -> np.ndarray:
        orders = [st.order if self.method == "singlestep" else 1 for st in self.plan]
        return np.concatenate([[0], np.cumsum(orders)[:-1]]).astype(int)

    def schedule_of(self, masks=None) -> list:
        """Normalised per-evaluation masks (None = compute everything) in evaluation order."""
        out = [check_mask(m, self.model.num_units) for m in self.evaluation_masks(masks)]
        if out[0] is not None:
            raise ConfigError("the first solver step must compute every sub-layer in its first model evaluation "
                              "(there is no cache yet)")
        return out

    def history_bytes(self, schedule=None, batch: int = 1) -> dict:
        """Forecast history a schedule keeps: none, U-ViT samples cached units as copies."""
        return dict(kept=0, all_units=0)

    def computed_share(self, masks=None) -> float:
        """Computed unit evaluations / (NFE x 2*num_blocks), per guidance branch."""
        return float(self.evaluation_masks(masks).mean())

    # ------------------------------------------------------------------ loop
    def _check_inputs(self, noise, y):
        cfg = self.model.config
        noise = jnp.asarray(noise, jnp.float32)
        if noise.ndim != 4 or noise.shape[1:] != (cfg.img_size, cfg.img_size, cfg.in_chans):
            raise ConfigError(f"noise has shape {tuple(noise.shape)}, the model takes "
                              f"(B, {cfg.img_size}, {cfg.img_size}, {cfg.in_chans})")
        if not cfg.conditional:
            if y is not None:
                raise ConfigError("this U-ViT is unconditional: pass y=None")
            return noise, None
        if y is None:
            raise ConfigError(f"this U-ViT is class-conditional ({cfg.num_classes - 1} classes + null): pass labels")
        y = jnp.asarray(y, jnp.int32)
        if y.shape != noise.shape[:1]:
            raise ConfigError(f"labels have shape {tuple(y.shape)} for a batch of {noise.shape[0]}")
        ylo, yhi = int(jnp.min(y)), int(jnp.max(y))
        if ylo < 0 or yhi > cfg.null_class:
            raise ConfigError(f"labels must lie in [0, {cfg.null_class}] ({cfg.null_class} = null class), "
                              f"got {ylo}..{yhi}")
        return noise, y

    def __call__(self, noise, y=None, masks=None, key=None, progress: bool = False, cfg_scale="default",
                 trace: Optional[List[dict]] = None, on_state=None, on_step=None):
        """noise (B,H,W,C) float32, y (B,) int labels (None if unconditional) -> latents (B,H,W,C).

        masks: the cache schedule, per model evaluation (NFE rows) or per solver
        step (`num_steps` rows, e.g. `Router.masks(thr)`); see `evaluation_masks`.
        trace: a list; every model call is appended to it in order (cond,
        then uncond) as a dict of NumPy arrays: x (B,H,W,C), t (B,) model
        time, y (B,) or None, out (B,H,W,C) the network's raw output.
        cfg_scale: this call's guidance scale (default: the constructor's); a
        sampler built with guidance takes any scale without compiling anything.
        key: accepted for one call form across families; DPM-Solver draws no noise.
        on_state: called as on_state(k, x) before every solver step k with the
        state (B,H,W,C) it starts from (at the solver's time of that step).
        on_step: called as on_step(e, units) after every model evaluation e with the
        tuple of the units' values the cache keeps (rows [cond | uncond] under
        batched guidance; the conditional branch's with batch_cfg=False). The next
        evaluation may take those buffers over: copy what you keep.
        """
        scale = call_scale(self.cfg_scale, cfg_scale, off_value=0.0)
        scale = None if scale is None else jnp.float32(scale)
        x, y = self._check_inputs(noise, y)
        schedule = self.schedule_of(masks)
        record = trace is not None
        plan = self._plan(schedule, record, carry=on_step is not None)
        params = self.model.params
        state = {"cache": self._cache(x.shape[0]) if self.strategy == "cond" else None, "e": 0}
        prev, t_prev = None, None
        it = enumerate(self.plan)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=self.num_steps, desc="sampling", leave=False)

        def model_fn(xx, tt, slot):
            # Evaluation e reuses what evaluation e-1 left in the cache, and leaves
            # its own cache only where evaluation e+1 reuses some sub-layer.
            e = state["e"]
            mask = schedule[e]
            cache_in, state["cache"] = (state["cache"] if plan[e][2] else None), None
            eps, state["cache"], calls = self.run(plan[e], params, xx, tt, y, cache_in, scale, self.mask_arg(mask),
                                                  aot_ok=not record)
            state["e"] = e + 1
            if on_step is not None:
                cache = state["cache"]
                on_step(e, cache[0] if self.cfg_scale is not None and not self.batch_cfg else cache)
            if record:
                for cx, ct, cy, co in calls:
                    trace.append({"x": np.asarray(cx), "t": np.asarray(ct),
                                  "y": None if cy is None else np.asarray(cy), "out": np.asarray(co)})
            return eps

        for k, st in it:
            if on_state is not None:
                on_state(k, x)
            s, t = jnp.float32(st.s), jnp.float32(st.t)
            # The solver's arithmetic runs eagerly between the jitted evaluations,
            # so evaluations with the same mask share one compiled program
            # whichever step they belong to.
            if self.method == "singlestep":
                x = self.solver.singlestep_update(model_fn, x, s, t, st.order)
            else:
                cur = self.solver.model_output(model_fn, x, s, 0)
                models, times = ((prev, cur), (t_prev, s)) if st.order == 2 else ((cur,), (s,))
                x = self.solver.multistep_update(x, models, times, t, st.order)
                prev, t_prev = cur, s
        if state["e"] != len(schedule):  # the plan and the solver disagree on the NFE: a bug, not bad input
            raise AssertionError(f"ran {state['e']} model evaluations for a schedule of {len(schedule)}")
        return x


def _masks_of(schedule):
    """The masks of a schedule (a `Schedule` or masks); U-ViT samples with copies only, for now."""
    if isinstance(schedule, Schedule):
        if schedule.forecasts:
            raise ConfigError(f"U-ViT samples cached units as copies; schedule {schedule.describe()!r} forecasts "
                              f"({schedule.forecast})")
        return schedule.masks
    return schedule


def sample_uvit(model, noise, y, steps: int, cfg_scale: Optional[float] = None, masks=None,
                solver: str = "dpm_solver2", trace: Optional[List[dict]] = None, progress: bool = False, **kw):
    """Samples latents from a U-ViT; `steps` is the NFE (see `UViTSampler`; kw go to its constructor)."""
    return UViTSampler(model, steps, cfg_scale=cfg_scale, solver=solver, **kw)(
        noise, y, masks=masks, progress=progress, trace=trace)
