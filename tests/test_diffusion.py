"""Gaussian diffusion: schedules, respacing, and the step functions against the original's numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc
from l2c_jax import ConfigError
from l2c_jax.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    respace_betas,
    space_timesteps,
)


FAMILY = "dit"  # the reference fixtures behind io / model / router (conftest)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------


def test_linear_schedule_matches_definition():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 0.0001 and b[-1] == 0.02
    # Scaled by 1000/T for other lengths, like the original.
    b500 = get_named_beta_schedule("linear", 500)
    assert math.isclose(b500[0], 0.0002) and math.isclose(b500[-1], 0.04)


def test_cosine_schedule():
    b = get_named_beta_schedule("cosine", 1000)
    assert np.array_equal(b, get_named_beta_schedule("squaredcos_cap_v2", 1000))
    assert b.max() <= 0.999 and (b > 0).all()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert b[10] == min(1 - f(11 / 1000) / f(10 / 1000), 0.999)
    with pytest.raises(ConfigError):
        get_named_beta_schedule("quadratic")


def test_space_timesteps():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    s = space_timesteps(1000, "25,25")
    assert len(s) == 50 and s[:2] == [0, 21] and s[24] == 499 and s[25] == 500 and s[-1] == 999
    # 300 steps in sections [10, 15, 20] (the original docstring's example).
    s = space_timesteps(300, [10, 15, 20])
    assert len(s) == 45 and s[9] == 99 and s[10] == 100 and s[-1] == 299
    assert space_timesteps(1000, "1000") == list(range(1000))
    with pytest.raises(ConfigError):
        space_timesteps(10, "20")
    with pytest.raises(ConfigError):
        space_timesteps(1000, "ddim600")  # no integer stride gives exactly 600 of 1000
    with pytest.raises(ConfigError):
        space_timesteps(1000, "ten")


def test_timestep_map_matches_fixture(io):
    d = create_diffusion(str(int(io["ddim_steps"])))
    assert d.num_timesteps == 10
    np.testing.assert_array_equal(d.timestep_map, io["timestep_map"])
    np.testing.assert_array_equal(d.timesteps_for_sampling(), io["timestep_map"])
    assert d.sampling_indices() == list(range(9, -1, -1))
    # The model sees the original timestep of each sampler step, t=999 first.
    np.testing.assert_array_equal(d.timestep_map[d.sampling_indices()], io["l2c_calls_t"][:, 0])


def test_respaced_betas_keep_alphas_cumprod():
    base = get_named_beta_schedule("linear", 1000)
    use = space_timesteps(1000, "50")
    betas, tmap = respace_betas(base, use)
    full = np.cumprod(1 - base)
    np.testing.assert_allclose(np.cumprod(1 - betas), full[tmap], rtol=1e-12)
    d = create_diffusion("50")
    np.testing.assert_array_equal(d.betas, betas)
    # No respacing = the original 1000-step process.
    d1000 = create_diffusion("")
    np.testing.assert_allclose(d1000.betas, base, rtol=1e-12)
    np.testing.assert_array_equal(d1000.timestep_map, np.arange(1000))


def test_tables_are_float64_and_posterior_log_variance_clipped():
    d = create_diffusion("10")
    assert d.alphas_cumprod.dtype == np.float64
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod ** 2, 1 / d.alphas_cumprod - 1, rtol=1e-12)


# ---------------------------------------------------------------------------
# Steps: against a float64 NumPy derivation
# ---------------------------------------------------------------------------


def _np_ddim(d, out, x, i, eta=0.0, noise=None):
    """DDIM (eq. 12 of the DDIM paper) in float64, channels last."""
    out = out.astype(np.float64)
    x = x.astype(np.float64)
    c = x.shape[-1]
    eps = out[..., :c]
    ab, abp = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
    x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    eps2 = (x / np.sqrt(ab) - x0) / np.sqrt(1 / ab - 1)
    sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
    xp = np.sqrt(abp) * x0 + np.sqrt(1 - abp - sigma ** 2) * eps2
    if eta and i > 0:
        xp = xp + sigma * noise
    return xp, x0


@pytest.mark.parametrize("channels", [4, 8])
def test_ddim_step_matches_float64_formula(channels):
    d = create_diffusion("20")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, channels)).astype(np.float32)
    step = jax.jit(lambda o, x, i: d.ddim_step(o, x, i, return_x0=True))
    for i in (19, 10, 1, 0):
        got, x0 = step(out, x, i)
        want, want_x0 = _np_ddim(d, out, x, i)
        scale = np.abs(want).max()
        assert np.abs(np.asarray(got) - want).max() / scale < 2e-6, i
        np.testing.assert_allclose(np.asarray(x0), want_x0, rtol=1e-4, atol=1e-4 * np.abs(want_x0).max())


def test_ddim_step_eta_and_per_sample_indices():
    d = create_diffusion("20")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    got = d.ddim_step(out, x, jnp.array([7, 0]), eta=0.5, noise=noise)
    for b, i in enumerate((7, 0)):
        want, _ = _np_ddim(d, out[b:b + 1], x[b:b + 1], i, eta=0.5, noise=noise[b:b + 1])
        np.testing.assert_allclose(np.asarray(got[b:b + 1]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError):
        d.ddim_step(out, x, 3, eta=0.5)  # noise required
    with pytest.raises(ConfigError):
        d.ddim_step(out[..., :5], x, 3)  # neither C nor 2C channels


def test_clip_denoised():
    d = create_diffusion("10")
    x = np.full((1, 2, 2, 4), 3.0, np.float32)
    out = np.zeros((1, 2, 2, 4), np.float32)
    x0 = d.predict_x0(out, x, 5, clip_denoised=True)
    assert float(jnp.max(x0)) == 1.0
    got = d.ddim_step(out, x, 5, clip_denoised=True)
    ab, abp = d.alphas_cumprod[5], d.alphas_cumprod_prev[5]
    eps = (3.0 / np.sqrt(ab) - 1.0) / np.sqrt(1 / ab - 1)
    np.testing.assert_allclose(np.asarray(got), np.sqrt(abp) + np.sqrt(1 - abp) * eps, rtol=1e-5)


def test_q_sample():
    d = create_diffusion("10")
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    t = np.array([9, 4, 0])
    got = jax.jit(d.q_sample)(x0, t, noise)
    ab = d.alphas_cumprod[t][:, None, None, None]
    want = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # Scalar index (traced under jit) broadcasts over the batch.
    got5 = jax.jit(d.q_sample)(x0, jnp.int32(5), noise)
    np.testing.assert_allclose(np.asarray(got5),
                               np.sqrt(d.alphas_cumprod[5]) * x0 + np.sqrt(1 - d.alphas_cumprod[5]) * noise,
                               rtol=1e-5, atol=1e-6)
    # DDIM from q_sample(x0, i, eps) with the true eps recovers x0 exactly (up to rounding).
    x0p = d.predict_x0_from_eps(got, t, noise)
    np.testing.assert_allclose(np.asarray(x0p), x0, atol=5e-4)


def test_ddpm_step_learned_range_and_fixed():
    d = create_diffusion("10")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    v = np.tanh(out[..., 4:])
    out = np.concatenate([out[..., :4], v], -1)
    noise = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    for i in (6, 0):
        got = np.asarray(d.ddpm_step(out, x, i, noise))
        _, x0 = _np_ddim(d, out, x, i)
        mean = d.posterior_mean_coef1[i] * x0 + d.posterior_mean_coef2[i] * x
        frac = (v.astype(np.float64) + 1) / 2
        logv = frac * np.log(d.betas[i]) + (1 - frac) * d.posterior_log_variance_clipped[i]
        want = mean + (i != 0) * np.exp(0.5 * logv) * noise
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # C channels: the original's FIXED_LARGE variance.
    got = np.asarray(d.ddpm_step(out[..., :4], x, 6, noise))
    _, x0 = _np_ddim(d, out, x, 6)
    mean = d.posterior_mean_coef1[6] * x0 + d.posterior_mean_coef2[6] * x
    np.testing.assert_allclose(got, mean + np.sqrt(d.betas[6]) * noise, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Steps: against the original's own sampling run
# ---------------------------------------------------------------------------


def test_ddim_step_reproduces_original_run(io):
    """Each DDIM update of the fixture's cached run, from its recorded model outputs.

    `l2c_calls_x[k]` is what the model saw at step k: [cond half | cond half]
    (forward_with_cfg duplicates the first half), `l2c_calls_out[k]` the raw
    model output. CFG on the first 3 channels, then one DDIM step, must give
    the next call's input (first half), and after the last step `ddim_l2c`.
    """
    d = create_diffusion("10")
    xs, outs = io["l2c_calls_x"], io["l2c_calls_out"]
    np.testing.assert_array_equal(xs[0], io["ddim_noise"])
    scale = 4.0
    step = jax.jit(d.ddim_step)
    for k, i in enumerate(d.sampling_indices()):
        out = outs[k].copy()
        cond, uncond = np.split(out[:, :3], 2)
        guided = uncond + scale * (cond - uncond)
        out[:, :3] = np.concatenate([guided, guided])
        half = len(xs[k]) // 2
        if k > 0:
            np.testing.assert_array_equal(xs[k][:half], xs[k][half:])
        x = nchw(step(nhwc(out), nhwc(xs[k]), i))
        want = xs[k + 1] if k + 1 < len(xs) else io["ddim_l2c"]
        # Only the first half is fed back by forward_with_cfg; the last step's
        # uncond half in ddim_l2c comes from a chain this test does not follow.
        err = np.abs(x[:half] - want[:half]).max() / np.abs(want[:half]).max()
        assert err < 1e-6, (k, err)


def test_diffusion_is_hashable_static_arg():
    d = create_diffusion("10")
    f = jax.jit(lambda diff, x: diff.q_sample(x, 3, x), static_argnums=0)
    assert f(d, jnp.ones((1, 2, 2, 4))).shape == (1, 2, 2, 4)
    with pytest.raises(ConfigError):
        GaussianDiffusion(betas=np.array([0.1, 1.5]), timestep_map=np.array([0, 1]))
