"""Gaussian diffusion as DiT samples and trains with it.

The schedule tables are computed in float64 NumPy exactly as the original
(OpenAI's improved-diffusion, as vendored by DiT) computes them, and a
respaced process is built the same way: keep a subset of the 1000 original
timesteps and re-derive betas from the kept `alphas_cumprod`. The step
functions are pure JAX on NHWC float32 arrays, usable inside `jax.jit`.

Numerical convention (it matters for parity over long sampling chains): the
original gathers a float64 table entry and casts it to float32
(`_extract_into_tensor`), then does every further operation (`sqrt`, products)
in float32. `_coef` below does the same: cast the float64 table to float32,
gather, and keep the arithmetic in float32 in the original's order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence, Union

import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------
# Schedules and respacing (float64 NumPy, host side)
# ---------------------------------------------------------------------------

def get_named_beta_schedule(name: str, num_diffusion_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Betas (float64) of a named schedule.

    "linear": Ho et al.'s 1e-4..0.02, scaled by 1000/steps so that the
    process stays similar for other step counts (DiT's default).
    "cosine" (the original's name "squaredcos_cap_v2" is accepted too):
    Nichol & Dhariwal's alpha-bar cosine, betas capped at 0.999.
    """
    n = int(num_diffusion_timesteps)
    if n < 1:
        raise ConfigError(f"diffusion steps must be positive, got {n}")
    if name == "linear":
        scale = 1000 / n
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ConfigError(f"unknown beta schedule {name!r} (known: linear, cosine)")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretises a continuous alpha_bar(t), t in [0, 1], into betas (Python floats, like the original)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> list:
    """The original timesteps a respaced process keeps, sorted ascending.

    `section_counts` is "ddimN" (the DDIM paper's integer stride: the first
    stride whose `range(0, T, stride)` has exactly N entries), or counts per
    equal section of the original process ("250", "10,15,20", [10, 15, 20]);
    within a section the kept steps are `round()`-ed fractional strides that
    include both ends of the section. Python's round (half to even) is what
    the original uses, so it is used here too.
    """
    if isinstance(section_counts, str):
        s = section_counts.strip()
        if s.startswith("ddim"):
            try:
                desired = int(s[len("ddim"):])
            except ValueError:
                raise ConfigError(f"bad respacing {section_counts!r}: expected ddimN") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ConfigError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
        try:
            counts = [int(x) for x in s.split(",")]
        except ValueError:
            raise ConfigError(f"bad respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ConfigError(f"bad respacing {section_counts!r}: every section needs at least one step")

    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    kept = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]):
    """Betas of the process that visits only `use_timesteps`, and the index map.

    Returns (new_betas float64, timestep_map int64) where timestep_map[i] is
    the original timestep of respaced index i. The new betas keep the same
    `alphas_cumprod` at the kept steps: beta_i = 1 - abar_i / abar_prev_kept.
    """
    use = set(int(t) for t in use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last = 1.0
    new_betas, tmap = [], []
    for i, ac in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(tmap, dtype=np.int64)


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------

_TABLES = (
    "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
    "fixed_large_variance", "fixed_large_log_variance",
)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity hash, so it can be a static jit argument.
class GaussianDiffusion:
    """A (respaced) Gaussian diffusion process: float64 tables + JAX steps.

    Indices `i` / `t_index` everywhere are RESPACED indices 0..num_timesteps-1
    (sampling runs num_timesteps-1 down to 0); the model is called with
    `timestep_map[i]` (see `timesteps_for_sampling`). `i` may be a Python
    int, a traced scalar or a (B,) integer array.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    original_num_steps: int = NUM_TRAIN_TIMESTEPS
    learn_sigma: bool = True

    def __post_init__(self):
        betas = np.array(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ConfigError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ConfigError("betas must lie in (0, 1]")
        tmap = np.array(self.timestep_map, dtype=np.int64)
        if tmap.shape != betas.shape:
            raise ConfigError(f"timestep_map has {tmap.size} entries for {betas.size} betas")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("betas", betas)
        set_("timestep_map", tmap)

        # The same float64 formulas as the original GaussianDiffusion.__init__.
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at index 0, so its log reuses index 1 there.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
        fixed_large = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas.copy()
        tables = dict(
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            alphas_cumprod_next=np.append(ac[1:], 0.0),
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            log_betas=np.log(betas),
            # FIXED_LARGE (used when the variance is not learned): like the
            # original, the first entry is the posterior variance for a better
            # decoder likelihood.
            fixed_large_variance=fixed_large,
            fixed_large_log_variance=np.log(fixed_large),
        )
        for k, v in tables.items():
            v.setflags(write=False)
            set_(k, v)
        # float32 copies for gathering inside traced code: casting the whole
        # table once is elementwise identical to the original's gather-then-cast.
        set_("_f32", {k: np.asarray(tables[k], dtype=np.float32) for k in tables})

    # -- construction ------------------------------------------------------
    @classmethod
    def create(
        cls,
        timestep_respacing: Union[str, int, Sequence[int], None] = "",
        noise_schedule: str = "linear",
        diffusion_steps: int = NUM_TRAIN_TIMESTEPS,
        learn_sigma: bool = True,
    ) -> "GaussianDiffusion":
        """Like the original `create_diffusion`: "" / None keeps all steps."""
        base = get_named_beta_schedule(noise_schedule, diffusion_steps)
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        use = space_timesteps(diffusion_steps, timestep_respacing)
        betas, tmap = respace_betas(base, use)
        return cls(betas=betas, timestep_map=tmap, original_num_steps=diffusion_steps, learn_sigma=learn_sigma)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def timesteps_for_sampling(self) -> np.ndarray:
        """Model-facing timestep of each respaced index: `out[i] = timestep_map[i]`.

        The original wraps the model so that respaced index i is passed to it
        as the original timestep timestep_map[i] (no rescaling). Indexed by
        respaced index, not in sampling order; see `sampling_indices`.
        """
        return self.timestep_map.copy()

    def sampling_indices(self) -> list:
        """Respaced indices in sampling order (num_timesteps-1 down to 0)."""
        return list(range(self.num_timesteps))[::-1]

    def model_timesteps(self, i) -> jnp.ndarray:
        """timestep_map[i] as int32, for a (possibly traced) respaced index."""
        return jnp.asarray(self.timestep_map.astype(np.int32))[i]

    # -- gathering ---------------------------------------------------------
    def _coef(self, name: str, i, ndim: int) -> jnp.ndarray:
        """Table entry for index i, float32, shaped to broadcast over an NHWC batch."""
        c = jnp.asarray(self._f32[name])[jnp.asarray(i)]
        if c.ndim == 1:  # per-sample indices (B,) -> (B, 1, 1, 1)
            c = c.reshape(c.shape + (1,) * (ndim - 1))
        return c

    def _split_output(self, model_output, x):
        """(eps, v or None): the learned-range variance output follows eps on channels."""
        c = x.shape[-1]
        if model_output.shape[-1] == 2 * c:
            return model_output[..., :c], model_output[..., c:]
        if model_output.shape[-1] == c:
            return model_output, None
        raise ConfigError(
            f"model output has {model_output.shape[-1]} channels; expected {c} (eps) or {2 * c} (eps and variance)"
        )

    # -- forward process ---------------------------------------------------
    def q_sample(self, x0, t_index, noise):
        """Sample x_t ~ q(x_t | x_0) for respaced index t_index."""
        x0 = jnp.asarray(x0, jnp.float32)
        return (self._coef("sqrt_alphas_cumprod", t_index, x0.ndim) * x0
                + self._coef("sqrt_one_minus_alphas_cumprod", t_index, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0, x_t, i):
        """Mean, variance and clipped log-variance of q(x_{i-1} | x_i, x_0)."""
        nd = x_t.ndim
        mean = self._coef("posterior_mean_coef1", i, nd) * x0 + self._coef("posterior_mean_coef2", i, nd) * x_t
        return (mean, self._coef("posterior_variance", i, nd),
                self._coef("posterior_log_variance_clipped", i, nd))

    # -- parameterisation conversions -----------------------------------------
    def predict_x0_from_eps(self, x_t, i, eps):
        nd = x_t.ndim
        return (self._coef("sqrt_recip_alphas_cumprod", i, nd) * x_t
                - self._coef("sqrt_recipm1_alphas_cumprod", i, nd) * eps)

    def predict_eps_from_x0(self, x_t, i, x0):
        nd = x_t.ndim
        return ((self._coef("sqrt_recip_alphas_cumprod", i, nd) * x_t - x0)
                / self._coef("sqrt_recipm1_alphas_cumprod", i, nd))

    def predict_x0(self, model_output, x, i, clip_denoised: bool = False):
        """x_0 prediction from a model output (eps, optionally with v channels)."""
        eps, _ = self._split_output(model_output, x)
        x0 = self.predict_x0_from_eps(x, i, eps)
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    def p_mean_variance(self, model_output, x, i, clip_denoised: bool = False) -> dict:
        """The original's p_mean_variance given the model output already computed.

        With 2C output channels the variance is LEARNED_RANGE: log variance =
        frac*log(beta) + (1-frac)*posterior_log_variance_clipped, frac=(v+1)/2.
        With C channels it is FIXED_LARGE, as the original picks for
        learn_sigma=False.
        """
        nd = x.ndim
        eps, v = self._split_output(model_output, x)
        if v is not None:
            min_log = self._coef("posterior_log_variance_clipped", i, nd)
            max_log = self._coef("log_betas", i, nd)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = jnp.exp(log_var)
        else:
            var = jnp.broadcast_to(self._coef("fixed_large_variance", i, nd), x.shape)
            log_var = jnp.broadcast_to(self._coef("fixed_large_log_variance", i, nd), x.shape)
        x0 = self.predict_x0_from_eps(x, i, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(x0, x, i)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": x0}

    # -- reverse steps -----------------------------------------------------
    @staticmethod
    def _nonzero(i, ndim):
        """1.0 where the index is not the last step (no noise is added at i == 0)."""
        nz = (jnp.asarray(i) != 0).astype(jnp.float32)
        if nz.ndim == 1:
            nz = nz.reshape(nz.shape + (1,) * (ndim - 1))
        return nz

    def ddim_step(self, model_output, x, i, eta: float = 0.0, noise=None, clip_denoised: bool = False,
                  return_x0: bool = False):
        """One DDIM update from respaced index i to i-1 (the original's ddim_sample).

        eps -> x0 = sqrt(1/abar)*x - sqrt(1/abar-1)*eps (clipped if asked);
        eps re-derived from that x0; x_prev = x0*sqrt(abar_prev) +
        sqrt(1-abar_prev-sigma^2)*eps (+ sigma*noise for eta > 0 and i > 0).
        Returns x_prev, or (x_prev, x0) with return_x0.
        """
        nd = x.ndim
        x0 = self.predict_x0(model_output, x, i, clip_denoised)
        eps = self.predict_eps_from_x0(x, i, x0)
        abar = self._coef("alphas_cumprod", i, nd)
        abar_prev = self._coef("alphas_cumprod_prev", i, nd)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
        mean_pred = x0 * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
        if isinstance(eta, (int, float)) and eta == 0.0:
            # Deterministic: sigma is exactly 0 and the noise term vanishes;
            # skipping it keeps `noise=None` legal.
            sample = mean_pred
        else:
            if noise is None:
                raise ConfigError("ddim_step with eta > 0 needs noise")
            sample = mean_pred + self._nonzero(i, nd) * sigma * noise
        return (sample, x0) if return_x0 else sample

    def ddpm_step(self, model_output, x, i, noise, clip_denoised: bool = False, return_x0: bool = False):
        """One ancestral step (the original's p_sample): mean + exp(log_var/2)*noise, no noise at i == 0."""
        out = self.p_mean_variance(model_output, x, i, clip_denoised)
        sample = out["mean"] + self._nonzero(i, x.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise
        return (sample, out["pred_xstart"]) if return_x0 else sample


def create_diffusion(
    timestep_respacing: Union[str, int, Sequence[int], None] = "",
    noise_schedule: str = "linear",
    diffusion_steps: int = NUM_TRAIN_TIMESTEPS,
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """DiT's `create_diffusion(str(num_sampling_steps))` equivalent."""
    return GaussianDiffusion.create(timestep_respacing, noise_schedule, diffusion_steps, learn_sigma)
