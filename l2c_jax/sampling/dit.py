"""DiT sampling with the learned cache: DDIM (or ancestral DDPM) over a respaced schedule.

Each sampler step is one jitted function of (params, x, cache, history,
coefficients, step, index, labels, noise, scale, mask). It consumes a
`Schedule` (`l2c_jax.schedule`): with the "static" strategy the cache mask of
a step is static, so every distinct mask compiles once and a reused sub-layer
is absent from that step's graph; with "cond" one graph takes the mask as an
array (`l2c_jax.sampling.base`). The feature cache is an explicit pytree
carried from one step to the next; a static step whose successor reads
nothing of it does not return it, so XLA need not keep those activations
alive. A forecasting schedule (TaylorSeer, a router trained with forecasts)
is planned once (`l2c_jax.sampling.forecast`): its history is carried the
same way, holding only the terms later steps read, and each reused unit's
forecast is formed inside the step's graph, one dispatch per step. The
latents, cache and history are donated to each step (their buffers are reused
for the step's outputs), so memory stays flat however many steps run;
`cache_dtype` / `history_dtype` (e.g. bfloat16) keep them narrower than the
computation. The guidance scale is an argument of the compiled step, not a
constant in it: changing it compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.diffusion.gaussian import create_diffusion
from l2c_jax.errors import ConfigError
from l2c_jax.models.cache import check_mask
from l2c_jax.sampling.base import Sampler, abstract, call_scale, cast_cache, computed_share
from l2c_jax.sampling.forecast import (ForecastPlan, StepPlan, TracedPlan, check_forecast, forecast_order,
                                       history_bytes, plan_forecast, step_entries, step_history)
from l2c_jax.schedule import Schedule


@dataclasses.dataclass
class Prepared:
    """A schedule as a sampler runs it: per-step masks, the forecast plan and its coefficient tables on the
    device (built once per distinct schedule and kept)."""

    schedule: Schedule
    masks: list  # per step: None (all computed) or a tuple of bools
    plan: Optional[ForecastPlan] = None
    coef: Optional[dict] = None
    strategy: str = "static"  # how this sampler runs it


def as_schedule(schedule=None, forecast: Optional[str] = None) -> Schedule:
    """A `Schedule` from what a sampler call was given: a Schedule, (steps, units) masks, or None (full);
    `forecast` overrides the schedule's own (masks alone copy)."""
    if isinstance(schedule, Schedule):
        if forecast is not None and check_forecast(forecast) != schedule.forecast:
            schedule = dataclasses.replace(schedule, forecast=forecast)
        return schedule
    if schedule is not None and not hasattr(schedule, "shape") and not isinstance(schedule, (list, tuple)):
        raise ConfigError(f"a schedule is a l2c_jax Schedule or (steps, units) masks, got {type(schedule).__name__}")
    return Schedule(masks=None if schedule is None else np.asarray(schedule, bool),
                    forecast=check_forecast(forecast))


class DiTSampler(Sampler):
    """Samples latents from a DiT `Model`.

    solver: "ddim" (eta 0 by default, deterministic given the noise) or "ddpm"
    (ancestral, needs a PRNG key). cfg_scale: None or 1.0 samples without
    guidance; otherwise the batch is doubled as [cond | null class] and guided
    as the original's `forward_with_cfg` (first `guidance_channels` channels);
    the scale given here is the default of `__call__`, which may pass another.
    cache_dtype: dtype of the feature cache carried between steps (None: the
    model's computation dtype); reused values are cast back before use.
    history_dtype: dtype a forecast's derivative terms are kept in (None:
    float32); the forecast itself is formed in float32.
    strategy: "static" (a graph per distinct mask), "cond" (one graph, each
    unit behind `lax.cond`) or "auto" (the backend's default; `l2c_jax.sampling.base`).
    """

    family = "dit"
    router_kind = "dit-ddim"
    solvers = ("ddim", "ddpm")
    default_solver = "ddim"
    rows_prefix, rows_label = "ddim", "DDIM"
    guidance_off = 1.0

    def __init__(self, model, steps: int, solver: str = "ddim", cfg_scale: Optional[float] = None,
                 eta: float = 0.0, respacing: Optional[str] = None, guidance_channels: Optional[int] = 3,
                 noise_schedule: str = "linear", cache_dtype=None, history_dtype=None, strategy: str = "static"):
        if model.family != "dit":
            raise ConfigError(f"DiTSampler needs a DiT model, got {model.family}")
        if solver not in ("ddim", "ddpm"):
            raise ConfigError(f"unknown DiT solver {solver!r}; use 'ddim' or 'ddpm'")
        if steps < 1:
            raise ConfigError(f"steps must be positive, got {steps}")
        self.model = model.on_devices()
        self.solver = solver
        self.cfg_scale = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
        if self.cfg_scale is not None and not model.config.has_null_class:
            raise ConfigError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs a null-class row, and this "
                              "DiT has none (trained with class dropout 0): sample with cfg_scale=1")
        self.eta = float(eta)
        self.guidance_channels = guidance_channels
        # The original samples with create_diffusion(str(num_sampling_steps)).
        self.diffusion = create_diffusion(respacing or str(steps), noise_schedule=noise_schedule,
                                          learn_sigma=model.config.learn_sigma)
        self.steps = self.diffusion.num_timesteps
        self._init_steps(strategy, cache_dtype)
        self.history_dtype = jnp.dtype(history_dtype or jnp.float32)
        self._prepared = {}

    @property
    def rows(self) -> int:
        """Rows of a schedule (and of this sampler's routers): one per sampler step."""
        return self.steps

    @property
    def draws_noise(self) -> bool:
        return self.solver == "ddpm" or self.eta > 0

    @classmethod
    def options_from_config(cls, sc) -> dict:
        return dict(eta=sc.get("eta", 0.0), guidance_channels=sc.get("guidance_channels", 3))

    def describe(self) -> tuple:
        return f"{self.steps} {self.solver.upper()} steps", f"{self.steps} x {self.model.num_units}"

    # ------------------------------------------------------------------ schedules
    def schedule_of(self, schedule=None, forecast: Optional[str] = None) -> Prepared:
        """The schedule (a `Schedule`, (steps, units) masks or None) checked against this sampler and
        prepared: per-step masks, and for a forecast its plan (`sampling.forecast.plan_forecast`)."""
        sched = as_schedule(schedule, forecast)
        key = sched.key()
        if key in self._prepared:
            return self._prepared[key]
        units = self.model.num_units
        if sched.masks is None:
            if sched.steps is not None and int(sched.steps) != self.steps:
                raise ConfigError(f"schedule {sched.describe()!r} runs {sched.steps} steps, this sampler "
                                  f"{self.steps}: sample with steps={sched.steps}")
            prepared = Prepared(sched, [None] * self.steps, strategy=self.strategy)
        else:
            if sched.masks.shape != (self.steps, units):
                raise ConfigError(f"cache masks have shape {sched.masks.shape}, the sampler needs "
                                  f"({self.steps}, {units}) (steps, sub-layers)")
            masks = [check_mask(m, units) for m in sched.masks]
            if masks[0] is not None:
                raise ConfigError("the first sampler step must compute every sub-layer (there is no cache yet)")
            plan = None
            if sched.forecasts:
                plan = plan_forecast(sched.masks, sched.anchor_rows(), forecast_order(sched.forecast),
                                     sched.coefficients)
            coef = None if plan is None else {k: jnp.asarray(v) for k, v in plan.coeffs.items()}
            # "auto" runs forecasting schedules as static graphs: under "cond" the forecast, formed for every
            # unit ahead of its conditional, measured 1.8x slower on the CPU (TaylorSeer 4/2, digits DiT).
            strategy = "static" if plan is not None and self.auto_strategy else self.strategy
            prepared = Prepared(sched, masks, plan, coef, strategy)
        self._prepared[key] = prepared
        return prepared

    def history_bytes(self, schedule=None, batch: int = 1) -> dict:
        """Peak bytes of forecast history for `batch` images, beside all-units float32 history
        (`sampling.forecast.history_bytes`); zeros for schedules that copy."""
        prepared = self.schedule_of(schedule)
        cfg = self.model.config
        rows = batch * (2 if self.cfg_scale is not None else 1)
        shape = (rows, (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size)
        return history_bytes(prepared.plan, shape, self.history_dtype, self.cache_dtype or self.model.dtype,
                             traced=prepared.strategy == "cond")

    # ------------------------------------------------------------------ steps
    def _step(self, params, x, cache, hist, hist_read, coef, s, i, y, noise, cfg_scale, mask_arr, *, mask,
              keep_cache, plan, order):
        mask = mask_arr if mask_arr is not None else mask
        t = jnp.broadcast_to(self.diffusion.model_timesteps(i), (x.shape[0],))
        stored = cache
        cache = cast_cache(cache, self.model.dtype if self.cache_dtype is not None else None)
        hist = {**hist, **hist_read}
        # The forecast is formed inside this graph from the carried history; reused units come out of the model
        # as their forecast values (the cache keeps each unit's latest value).
        entries = cache if plan is None else step_entries(plan, cache, hist, coef, s)
        if cfg_scale is None:
            out, new_cache = self.model.apply(params, x, t, y, entries, mask)
        else:
            out, new_cache = self.model.apply_cfg(params, x, t, y, cfg_scale, entries, mask,
                                                  guidance_channels=self.guidance_channels)
        if self.solver == "ddim":
            x = self.diffusion.ddim_step(out, x, i, eta=self.eta, noise=noise)
        else:
            x = self.diffusion.ddpm_step(out, x, i, noise)
        if plan is not None:
            hist = step_history(plan, stored, new_cache, hist, coef, s, self.history_dtype)
        cache = cast_cache(new_cache, self.cache_dtype) if keep_cache else None
        terms = tuple(hist[k] for k in order.out) if plan is not None else ()
        # Outputs in the arrangement's order: jax hands donated buffers to outputs of the same type in order.
        return (x, terms, cache) if order.history_first else (x, cache, terms)

    def _plan(self, prepared, carry: bool = False) -> list:
        # static: (mask, keep the cache for the next step, a cache comes in, the step's forecast plan);
        # cond: one graph per forecast layout, cache always carried. carry: every step returns its units
        # (on_step reads each value).
        plan = prepared.plan
        if prepared.strategy == "cond":
            return [("cond", True, True, None if plan is None else plan.traced())] * len(prepared.masks)
        keys, has_cache = [], False
        n = len(prepared.masks)
        for s, m in enumerate(prepared.masks):
            if s + 1 < n:
                needed = plan.cache_needed[s + 1] if plan is not None else prepared.masks[s + 1] is not None
            else:
                needed = False
            keep = carry or needed
            keys.append((m, keep, has_cache, None if plan is None else plan.steps[s]))
            has_cache = keep
        return keys

    def _arrange(self, key) -> "Arrangement":
        """How a step passes and returns its buffers so that XLA updates them in place, without copies.

        Usually the cache and the history are donated and come back in the same order (a reused unit's
        forecast is written over its latest value, terms pass through). An anchor that derives terms reads
        the incoming cache, d1 and d2 after its new values exist, and XLA's CPU backend fuses d1 and d2 in
        separate loops: there the new values take fresh buffers, old d1's buffer takes the new d2 and old
        d2's the new d1 (each loop then overwrites only what it alone reads), and p is only read.
        """
        _, keep, has_cache, plan = key
        hist_in, hist_out = _layouts(plan)
        cd, hd = jnp.dtype(self.cache_dtype or self.model.dtype), self.history_dtype
        units = self.model.num_units

        def dtype(k):
            return cd if k[0] == "p" else hd

        derives = isinstance(plan, StepPlan) and plan.anchor and any(plan.derive)
        if derives:
            out = tuple(k for k in hist_out if k[0] == "d2") + tuple(k for k in hist_out if k[0] == "d1") + \
                tuple(k for k in hist_out if k[0] == "p")
            donated = tuple(k for k in hist_in if k[0] != "p")
            cache_in = 0
        else:
            out, donated, cache_in = tuple(hist_out), tuple(hist_in), units if has_cache else 0
        # Donate a group only where every buffer of it finds an output of its type (no unusable donations).
        free = {}
        for d, n in [(cd, units if keep else 0)] + [(dtype(k), 1) for k in out]:
            free[d] = free.get(d, 0) + n
        donate_cache = cache_in > 0 and free.get(cd, 0) >= cache_in
        if donate_cache:
            free[cd] -= cache_in
        need = {}
        for k in donated:
            need[dtype(k)] = need.get(dtype(k), 0) + 1
        if not all(free.get(d, 0) >= n for d, n in need.items()):
            donated = ()
        read = tuple(k for k in hist_in if k not in donated)
        return Arrangement(donated, read, out, derives, donate_cache)

    def _build(self, key):
        mask, keep, has_cache, plan = key
        mask = None if mask == "cond" else mask
        order = self._arrange(key)
        donate = [1] + ([2] if order.donate_cache else []) + ([3] if order.donated else [])
        return jax.jit(functools.partial(self._step, mask=mask, keep_cache=keep, plan=plan, order=order),
                       donate_argnums=tuple(donate))

    def run_step(self, key, x, cache, hist, coef, s, i, y, noise, scale, mask_arr, aot_ok: bool = True):
        """One step of `key`: (x, cache, history dict) after it."""
        order = self._arrange(key)
        x, a, b = self.run(key, self.model.params, x, cache, {k: hist[k] for k in order.donated},
                           {k: hist[k] for k in order.read}, coef, s, i, y, noise, scale, mask_arr, aot_ok=aot_ok)
        terms, cache = (a, b) if order.history_first else (b, a)
        return x, cache, dict(zip(order.out, terms))

    def _rows(self, x) -> int:
        return int(x.shape[0]) // (2 if self.cfg_scale is not None else 1)

    def _unit_shape(self, rows: int) -> tuple:
        cfg = self.model.config
        return (rows, (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def _cache_units(self, rows: int, abstract_only: bool = False):
        shape, dtype = self._unit_shape(rows), self.cache_dtype or self.model.dtype
        if abstract_only:
            return (jax.ShapeDtypeStruct(shape, dtype),) * self.model.num_units
        return tuple(jnp.zeros(shape, dtype) for _ in range(self.model.num_units))

    def _history(self, layout, rows: int, abstract_only: bool = False) -> dict:
        shape = self._unit_shape(rows)
        out = {}
        for term, u in layout:
            dtype = (self.cache_dtype or self.model.dtype) if term == "p" else self.history_dtype
            out[(term, u)] = jax.ShapeDtypeStruct(shape, dtype) if abstract_only else jnp.zeros(shape, dtype)
        return out

    def _lower(self, key, batch: int):
        cfg = self.model.config
        rows = batch * (2 if self.cfg_scale is not None else 1)
        x = jax.ShapeDtypeStruct((rows, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
        y = jax.ShapeDtypeStruct((rows,), jnp.int32)
        cache = self._cache_units(rows, abstract_only=True) if key[2] else None
        order = self._arrange(key)
        hist = self._history(order.donated, rows, abstract_only=True)
        hist_read = self._history(order.read, rows, abstract_only=True)
        coef = None
        if key[3] is not None:
            n, u = self.steps, cfg.num_units
            coef = {k: jax.ShapeDtypeStruct((n,) if k in ("dt", "anchor") else (n, u), jnp.float32)
                    for k in COEFFICIENTS}
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        noise = x if self.draws_noise else None  # ancestral steps take their noise as an input
        scale = None if self.cfg_scale is None else jax.ShapeDtypeStruct((), jnp.float32)
        mask_arr = jax.ShapeDtypeStruct((cfg.num_units,), jnp.bool_) if key[0] == "cond" else None
        return self.function(key).lower(abstract(self.model.params), x, cache, hist, hist_read, coef, scalar, scalar,
                                        y, noise, scale, mask_arr)

    # ------------------------------------------------------------------ loop
    def computed_share(self, schedule=None) -> float:
        """Share of sub-layer evaluations the schedule computes (1.0 without a cache)."""
        prepared = self.schedule_of(schedule)
        return computed_share(prepared.schedule.masks, self.steps, self.model.num_units)

    def check_labels(self, y) -> None:
        """Refuses labels outside the model's table (the null class only where the table has its row)."""
        cfg = self.model.config
        ylo, yhi = int(jnp.min(y)), int(jnp.max(y))
        top = cfg.num_classes if cfg.has_null_class else cfg.num_classes - 1
        if ylo < 0 or yhi > top:
            what = (f"({cfg.num_classes} = null class)" if cfg.has_null_class
                    else "(this DiT has no null-class row: it was trained with class dropout 0)")
            raise ConfigError(f"labels must lie in [0, {top}] {what}, got {ylo}..{yhi}")

    def __call__(self, noise, y, schedule=None, key=None, progress: bool = False, cfg_scale="default",
                 max_steps: int = 0, forecast: Optional[str] = None, on_step=None, on_state=None, masks=None):
        """noise (B,H,W,C) float32, y (B,) int labels -> latents (B,H,W,C).

        schedule: a `l2c_jax.schedule.Schedule` (masks, forecast, anchors), or
        (steps, units) bool masks (`masks=` works too), or None (every unit).
        forecast: how reused units are formed, overriding the schedule's own:
        "copy" (the cache methods, L2C's included) or TaylorSeer's "taylor1" /
        "taylor2" (`sampling.forecast`); masks alone copy.
        key: the PRNG key of DDPM / eta > 0 noise: one key for the batch, or one
        per sample ((B,) keys), whose step noise then depends on that key only.

        cfg_scale: the guidance scale of this call (default: the constructor's).
        A sampler built without guidance samples without it; one built with
        guidance takes any scale, without compiling anything new.
        max_steps: run only the first `max_steps` steps (benchmarks time a prefix).
        on_step: called as on_step(step, units) after every step with the tuple of
        the units' values the cache keeps (computed, or a reused unit's last one).
        The next step takes those buffers over: copy what you keep.
        on_state: called as on_state(step, x) before every step with the state the
        step starts from ((B,H,W,C), the conditional half under guidance); the
        step takes x over too, so copy what you keep (np.asarray does).
        """
        if masks is not None:
            if schedule is not None:
                raise ConfigError("pass a schedule or masks, not both")
            schedule = masks
        scale = call_scale(self.cfg_scale, cfg_scale, off_value=1.0)
        noise = jnp.asarray(noise, jnp.float32)
        y = jnp.asarray(y, jnp.int32)
        cfg = self.model.config
        if noise.ndim != 4 or noise.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ConfigError(f"noise has shape {tuple(noise.shape)}, the model takes "
                              f"(B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels})")
        if y.shape != noise.shape[:1]:
            raise ConfigError(f"labels have shape {tuple(y.shape)} for a batch of {noise.shape[0]}")
        self.check_labels(y)
        if self.solver == "ddpm" or self.eta > 0:
            if key is None:
                raise ConfigError(f"{self.solver} with eta={self.eta} draws noise: pass a PRNG key")
        b = noise.shape[0]
        key = _as_keys(key, b)
        if self.cfg_scale is not None:
            x = jnp.concatenate([noise, noise], 0)
            y = jnp.concatenate([y, jnp.full_like(y, cfg.null_class)], 0)
        else:
            x = jnp.array(noise, copy=True)  # the steps donate x: never hand them the caller's array
        prepared = self.schedule_of(schedule, forecast)
        plan = self._plan(prepared, carry=on_step is not None)
        cache = self._cache_units(x.shape[0]) if prepared.strategy == "cond" else None
        hist = self._history(_layouts(plan[0][3])[0], x.shape[0])
        indices = self.diffusion.sampling_indices()
        if max_steps and max_steps < len(indices):
            plan, indices = plan[:max_steps], indices[:max_steps]
        it = enumerate(indices)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(indices), desc="sampling", leave=False)
        for s, i in it:
            step_noise = None
            if key is not None and key.ndim == 0:  # one key for the batch
                key, sub = jax.random.split(key)
                step_noise = jax.random.normal(sub, x.shape, x.dtype)
            elif key is not None:  # a key per sample: its noise does not depend on the batch it is in
                step_noise = _per_sample_normal(key, jnp.int32(s), x.shape[1:])
                if self.cfg_scale is not None:  # the null half's noise is never used (forward_with_cfg)
                    step_noise = jnp.concatenate([step_noise, step_noise], 0)
            if on_state is not None:
                on_state(s, x[:b])
            x, cache, hist = self.run_step(plan[s], x, cache, hist, prepared.coef, jnp.int32(s), jnp.int32(i), y,
                                           step_noise, None if scale is None else jnp.float32(scale),
                                           self.mask_arg(prepared.masks[s], prepared.strategy))
            if on_step is not None:
                on_step(s, cache)
        return x[:b]


@dataclasses.dataclass(frozen=True)
class Arrangement:
    """How one step's history is passed (donated / only read) and returned (`DiTSampler._arrange`)."""

    donated: tuple
    read: tuple
    out: tuple
    history_first: bool
    donate_cache: bool


COEFFICIENTS = ("a1", "a2", "back1", "back2", "dt", "anchor", "derive1", "derive2", "prev_p", "save_p")


def _layouts(plan) -> tuple:
    """(history keys a step takes, history keys it returns) for a step's forecast plan (None: none)."""
    if plan is None:
        return (), ()
    if isinstance(plan, TracedPlan):
        return plan.layout, plan.layout
    return plan.hist_in, plan.hist_out


def _as_keys(key, batch: int):
    """A typed PRNG key (scalar) or a (batch,) array of them, from typed or raw uint32 keys."""
    if key is None:
        return None
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    if key.ndim > 1 or (key.ndim == 1 and key.shape[0] != batch):
        raise ConfigError(f"key: one PRNG key or one per sample ({batch}), got shape {tuple(key.shape)}")
    return key


@functools.partial(jax.jit, static_argnums=(2,))
def _per_sample_normal(keys, step, shape):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)
