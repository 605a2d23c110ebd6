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

The solver loop and its arithmetic stay in Python (a few small ops per
step); every model evaluation is one call of a jitted function whose cache
mask is static. Each distinct mask compiles once (kept in
`UViTSampler._compiled`), shared by every step that uses it, and a reused
sub-layer is absent from that program. The cache is an explicit pytree
carried between evaluations, returned only when the next step reuses it. By
default the conditional and unconditional branches run as one batch
[cond | uncond] (each sample's cache rows are its own, so the branches keep
separate caches); `batch_cfg=False` runs them as two calls like the original.
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


class UViTSampler:
    """Samples latents from a U-ViT `Model` with DPM-Solver (data prediction).

    steps: NFE, model evaluations per sample and branch (the released routers'
    dpm20 / dpm50). solver: a `SOLVERS` name; the original and its routers use
    "dpm_solver2" (NFE // 2 solver steps). cfg_scale: guidance scale of
    `cond + s * (cond - uncond)`; None or 0 disables it. skip_type:
    "time_uniform" (the original), "logSNR" or "time_quadratic". schedule:
    a `DiscreteVPSchedule`, by default the Stable-Diffusion betas.
    t_start / t_end: the time range, by default 1 and 1/N.
    """

    def __init__(self, model, steps: int, cfg_scale: Optional[float] = None, solver: str = "dpm_solver2",
                 skip_type: str = "time_uniform", schedule: Optional[DiscreteVPSchedule] = None,
                 t_start: Optional[float] = None, t_end: Optional[float] = None, batch_cfg: bool = True,
                 solver_type: str = "dpm_solver"):
        if model.family != "uvit":
            raise ConfigError(f"UViTSampler needs a U-ViT model, got {model.family}")
        self.model = model
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
        self._compiled = {}

    @property
    def num_steps(self) -> int:
        """Solver steps: rows of the cache masks."""
        return len(self.plan)

    def timesteps(self) -> np.ndarray:
        """(num_steps + 1,) float32 continuous times the steps run between."""
        return np.array([st.s for st in self.plan] + [self.plan[-1].t], dtype=np.float32)

    # ------------------------------------------------------------------ one guided evaluation
    def _eval(self, params, x, t, y, cache, *, mask, keep_cache, record):
        """Guided noise prediction at continuous time t (scalar), the new cache if kept, the calls if recorded."""
        b = x.shape[0]
        tm = jnp.broadcast_to(self.schedule.model_time(t), (b,))
        if self.cfg_scale is None:
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
            eps = cond + self.cfg_scale * (cond - uncond)
        return eps, (new_cache if keep_cache else None), (calls if record else None)

    def eval_fn(self, mask, keep_cache: bool, record: bool = False):
        """The jitted guided evaluation for one static mask (compiled on first use, then reused).

        It returns the cache only where the next step reuses it, so XLA can
        drop those activations everywhere else.
        """
        key = (mask, keep_cache, record)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(self._eval, mask=mask, keep_cache=keep_cache,
                                                            record=record))
        return self._compiled[key]

    def schedule_masks(self, masks=None) -> list:
        """Normalised per-step masks (None = compute everything) in sampling order."""
        if masks is None:
            return [None] * self.num_steps
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (self.num_steps, self.model.num_units):
            raise ConfigError(f"cache masks have shape {masks.shape}, the sampler needs "
                              f"({self.num_steps}, {self.model.num_units}) (solver steps, sub-layers)")
        out = [check_mask(m, self.model.num_units) for m in masks]
        if out[0] is not None:
            raise ConfigError("the first solver step must compute every sub-layer (there is no cache yet)")
        return out

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

    def __call__(self, noise, y=None, masks=None, trace: Optional[List[dict]] = None, progress: bool = False):
        """noise (B,H,W,C) float32, y (B,) int labels (None if unconditional) -> latents (B,H,W,C).

        masks: (num_steps, 2*num_blocks) bools, row k the mask of the first
        evaluation of solver step k (row 0 all True), e.g. `Router.masks(thr)`.
        trace: a list; every model call is appended to it in order (cond,
        then uncond) as a dict of NumPy arrays: x (B,H,W,C), t (B,) model
        time, y (B,) or None, out (B,H,W,C) the network's raw output.
        """
        x, y = self._check_inputs(noise, y)
        schedule = self.schedule_masks(masks)
        record = trace is not None
        params = self.model.params
        state = {"cache": None}
        prev, t_prev = None, None
        it = enumerate(self.plan)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=self.num_steps, desc="sampling", leave=False)
        for k, st in it:
            mask = schedule[k]
            keep = k + 1 < self.num_steps and schedule[k + 1] is not None
            last = st.order - 1 if self.method == "singlestep" else 0
            cache_in = state["cache"] if mask is not None else None

            def model_fn(xx, tt, slot, mask=mask, keep=keep, last=last, cache_in=cache_in):
                # Only the step's first evaluation may reuse the cache; its last one refills it.
                fn = self.eval_fn(mask if slot == 0 else None, keep and slot == last, record)
                eps, new_cache, calls = fn(params, xx, tt, y, cache_in if slot == 0 else None)
                if slot == last:
                    state["cache"] = new_cache
                if record:
                    for cx, ct, cy, co in calls:
                        trace.append({"x": np.asarray(cx), "t": np.asarray(ct),
                                      "y": None if cy is None else np.asarray(cy), "out": np.asarray(co)})
                return eps

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
        return x


def sample_uvit(model, noise, y, steps: int, cfg_scale: Optional[float] = None, masks=None,
                solver: str = "dpm_solver2", trace: Optional[List[dict]] = None, progress: bool = False, **kw):
    """Samples latents from a U-ViT; `steps` is the NFE (see `UViTSampler`; kw go to its constructor)."""
    return UViTSampler(model, steps, cfg_scale=cfg_scale, solver=solver, **kw)(
        noise, y, masks=masks, trace=trace, progress=progress)
