"""DiT sampling with the learned cache: DDIM (or ancestral DDPM) over a respaced schedule.

Each sampler step is one jitted function of (params, x, cache, index, labels,
noise, scale, mask). With the "static" strategy the cache mask of a step is
static, so every distinct mask compiles once and a reused sub-layer is absent
from that step's graph; with "cond" one graph takes the mask as an array
(`l2c_jax.sampling.base`). The feature cache is an explicit pytree carried
from one step to the next; a static step whose successor reuses nothing does
not return it, so XLA need not keep those activations alive. The latents and
the cache are donated to each step (their buffers are reused for the step's
outputs), so memory stays flat however many steps run; `cache_dtype` (e.g.
bfloat16) keeps the carried cache narrower than the computation. The
guidance scale is an argument of the compiled step, not a constant in it:
changing it compiles nothing.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.diffusion.gaussian import create_diffusion
from l2c_jax.errors import ConfigError
from l2c_jax.models.cache import check_mask
from l2c_jax.sampling.base import Sampler, abstract, call_scale, cast_cache, computed_share
from l2c_jax.sampling.forecast import Forecaster, check_forecast


class DiTSampler(Sampler):
    """Samples latents from a DiT `Model`.

    solver: "ddim" (eta 0 by default, deterministic given the noise) or "ddpm"
    (ancestral, needs a PRNG key). cfg_scale: None or 1.0 samples without
    guidance; otherwise the batch is doubled as [cond | null class] and guided
    as the original's `forward_with_cfg` (first `guidance_channels` channels);
    the scale given here is the default of `__call__`, which may pass another.
    cache_dtype: dtype of the feature cache carried between steps (None: the
    model's computation dtype); reused values are cast back before use.
    strategy: "static" (a graph per distinct mask), "cond" (one graph, each
    unit behind `lax.cond`) or "auto" (the backend's default; `l2c_jax.sampling.base`).
    """

    family = "dit"
    router_kind = "dit-ddim"
    solvers = ("ddim", "ddpm")
    guidance_off = 1.0

    def __init__(self, model, steps: int, solver: str = "ddim", cfg_scale: Optional[float] = None,
                 eta: float = 0.0, respacing: Optional[str] = None, guidance_channels: Optional[int] = 3,
                 noise_schedule: str = "linear", cache_dtype=None, strategy: str = "static"):
        if model.family != "dit":
            raise ConfigError(f"DiTSampler needs a DiT model, got {model.family}")
        if solver not in ("ddim", "ddpm"):
            raise ConfigError(f"unknown DiT solver {solver!r}; use 'ddim' or 'ddpm'")
        if steps < 1:
            raise ConfigError(f"steps must be positive, got {steps}")
        self.model = model.on_devices()
        self.solver = solver
        self.cfg_scale = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
        self.eta = float(eta)
        self.guidance_channels = guidance_channels
        # The original samples with create_diffusion(str(num_sampling_steps)).
        self.diffusion = create_diffusion(respacing or str(steps), noise_schedule=noise_schedule,
                                          learn_sigma=model.config.learn_sigma)
        self.steps = self.diffusion.num_timesteps
        self._init_steps(strategy, cache_dtype)

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

    # ------------------------------------------------------------------ steps
    def _step(self, params, x, cache, i, y, noise, cfg_scale, mask_arr, *, mask, keep_cache):
        mask = mask_arr if mask_arr is not None else mask
        t = jnp.broadcast_to(self.diffusion.model_timesteps(i), (x.shape[0],))
        cache = cast_cache(cache, self.model.dtype if self.cache_dtype is not None else None)
        if cfg_scale is None:
            out, new_cache = self.model.apply(params, x, t, y, cache, mask)
        else:
            out, new_cache = self.model.apply_cfg(params, x, t, y, cfg_scale, cache, mask,
                                                  guidance_channels=self.guidance_channels)
        if self.solver == "ddim":
            x = self.diffusion.ddim_step(out, x, i, eta=self.eta, noise=noise)
        else:
            x = self.diffusion.ddpm_step(out, x, i, noise)
        return x, (cast_cache(new_cache, self.cache_dtype) if keep_cache else None)

    def _plan(self, schedule, carry: bool = False, keep_history: bool = False) -> list:
        # static: (mask, keep the cache for the next step, a cache comes in, donate it); cond: one graph, cache
        # always carried. carry: every step returns its units (a forecast or a calibration reads each value).
        # keep_history: the incoming cache is not donated (a forecaster holds those buffers).
        if self.strategy == "cond":
            return [("cond", True, True, not keep_history)] * len(schedule)
        keys, has_cache = [], False
        for s, m in enumerate(schedule):
            keep = carry or (s + 1 < len(schedule) and schedule[s + 1] is not None)
            keys.append((m, keep, has_cache, not keep_history))
            has_cache = keep
        return keys

    def _build(self, key):
        mask, keep, _, donate = key
        mask = None if mask == "cond" else mask
        # x always, and the incoming cache where the step passes one on, give their buffers to the outputs.
        return jax.jit(functools.partial(self._step, mask=mask, keep_cache=keep),
                       donate_argnums=(1, 2) if keep and donate else (1,))

    def _rows(self, x) -> int:
        return int(x.shape[0]) // (2 if self.cfg_scale is not None else 1)

    def _cache_units(self, rows: int, abstract_only: bool = False):
        cfg = self.model.config
        shape = (rows, (cfg.input_size // cfg.patch_size) ** 2, cfg.hidden_size)
        dtype = self.cache_dtype or self.model.dtype
        if abstract_only:
            return (jax.ShapeDtypeStruct(shape, dtype),) * cfg.num_units
        return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_units))

    def _lower(self, key, batch: int):
        cfg = self.model.config
        rows = batch * (2 if self.cfg_scale is not None else 1)
        x = jax.ShapeDtypeStruct((rows, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
        y = jax.ShapeDtypeStruct((rows,), jnp.int32)
        cache = self._cache_units(rows, abstract_only=True) if key[2] else None
        scale = None if self.cfg_scale is None else jax.ShapeDtypeStruct((), jnp.float32)
        mask_arr = jax.ShapeDtypeStruct((cfg.num_units,), jnp.bool_) if key[0] == "cond" else None
        return self.function(key).lower(abstract(self.model.params), x, cache, jax.ShapeDtypeStruct((), jnp.int32),
                                        y, None, scale, mask_arr)

    def schedule_of(self, masks=None) -> list:
        """Normalised per-step masks in sampling order (None = compute everything)."""
        if masks is None:
            return [None] * self.steps
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != (self.steps, self.model.num_units):
            raise ConfigError(f"cache masks have shape {masks.shape}, the sampler needs "
                              f"({self.steps}, {self.model.num_units}) (steps, sub-layers)")
        out = [check_mask(m, self.model.num_units) for m in masks]
        if out[0] is not None:
            raise ConfigError("the first sampler step must compute every sub-layer (there is no cache yet)")
        return out

    # ------------------------------------------------------------------ loop
    def computed_share(self, masks=None) -> float:
        """Share of sub-layer evaluations the schedule computes (1.0 without a cache)."""
        return computed_share(masks, self.steps, self.model.num_units)

    def __call__(self, noise, y, masks=None, key=None, progress: bool = False, cfg_scale="default",
                 max_steps: int = 0, forecast: str = "copy", on_step=None, on_state=None):
        """noise (B,H,W,C) float32, y (B,) int labels -> latents (B,H,W,C).

        key: the PRNG key of DDPM / eta > 0 noise: one key for the batch, or one
        per sample ((B,) keys), whose step noise then depends on that key only.

        cfg_scale: the guidance scale of this call (default: the constructor's).
        A sampler built without guidance samples without it; one built with
        guidance takes any scale, without compiling anything new.
        max_steps: run only the first `max_steps` steps (benchmarks time a prefix).
        forecast: how a reused unit's value is formed: "copy" (the cache methods,
        L2C's included) or TaylorSeer's "taylor1" / "taylor2" (`sampling.forecast`).
        on_step: called as on_step(step, units) after every step with the tuple of
        the units' values the step left (computed or reused).
        The next step takes those buffers over: copy what you keep.
        on_state: called as on_state(step, x) before every step with the state the
        step starts from ((B,H,W,C), the conditional half under guidance); the
        step takes x over too, so copy what you keep (np.asarray does).
        """
        scale = call_scale(self.cfg_scale, cfg_scale, off_value=1.0)
        noise = jnp.asarray(noise, jnp.float32)
        y = jnp.asarray(y, jnp.int32)
        cfg = self.model.config
        if noise.ndim != 4 or noise.shape[1:] != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ConfigError(f"noise has shape {tuple(noise.shape)}, the model takes "
                              f"(B, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels})")
        if y.shape != noise.shape[:1]:
            raise ConfigError(f"labels have shape {tuple(y.shape)} for a batch of {noise.shape[0]}")
        ylo, yhi = int(jnp.min(y)), int(jnp.max(y))
        if ylo < 0 or yhi > cfg.num_classes:
            raise ConfigError(f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                              f"got {ylo}..{yhi}")
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
        schedule = self.schedule_of(masks)
        forecaster = Forecaster(forecast, self.model.num_units) if check_forecast(forecast) != "copy" else None
        plan = self._plan(schedule, carry=forecaster is not None or on_step is not None,
                          keep_history=forecaster is not None)
        cache = self._cache_units(x.shape[0]) if self.strategy == "cond" else None
        indices = self.diffusion.sampling_indices()
        if max_steps and max_steps < len(indices):
            schedule, plan, indices = schedule[:max_steps], plan[:max_steps], indices[:max_steps]
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
            if forecaster is not None:
                cache = forecaster.inputs(s, schedule[s], cache)
            x, cache = self.run(plan[s], self.model.params, x, cache, jnp.int32(i), y, step_noise,
                                None if scale is None else jnp.float32(scale), self.mask_arg(schedule[s]),
                                aot_ok=step_noise is None)
            if forecaster is not None:
                forecaster.update(s, schedule[s], cache)
            if on_step is not None:
                on_step(s, cache)
        return x[:b]


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
