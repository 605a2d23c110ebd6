"""The discrete VP schedule's continuous view and DPM-Solver's convergence on an analytic model."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from l2c_jax import ConfigError
from l2c_jax.diffusion.dpm_solver import DPMSolver
from l2c_jax.diffusion.vp import DiscreteVPSchedule, interpolate, stable_diffusion_betas

N = 1000


@pytest.fixture(scope="module")
def ns():
    return DiscreteVPSchedule.stable_diffusion()


def ref_log_alpha(t):
    """float64 re-derivation: knots (i+1)/N, log alpha = 0.5 cumsum log(1 - b), linear (extrapolated) between."""
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, N, dtype=np.float64) ** 2
    knots_t = np.arange(1, N + 1, dtype=np.float64) / N
    knots_la = 0.5 * np.cumsum(np.log1p(-b))
    t = np.asarray(t, np.float64)
    i = np.clip(np.searchsorted(knots_t, t, side="right") - 1, 0, N - 2)
    return knots_la[i] + (t - knots_t[i]) * (knots_la[i + 1] - knots_la[i]) / (knots_t[i + 1] - knots_t[i])


def ref_lambda(t):
    la = ref_log_alpha(t)
    return la - 0.5 * np.log(-np.expm1(2 * la))


# ---------------------------------------------------------------------------- the schedule
def test_stable_diffusion_betas():
    b = stable_diffusion_betas()
    assert b.shape == (N,) and b.dtype == np.float64
    np.testing.assert_allclose([b[0], b[-1]], [0.00085, 0.012], rtol=1e-12)
    assert (np.diff(np.sqrt(b)) > 0).all()


def test_knots(ns):
    np.testing.assert_allclose(ns.t_knots, np.arange(1, N + 1) / N, rtol=1e-7)
    assert ns.t_knots.dtype == np.float32 and ns.log_alpha_knots.dtype == np.float32
    # The original builds the knots from float32 betas (1 - b rounded to float32): ~1e-6 from float64.
    np.testing.assert_allclose(ns.log_alpha_knots, ref_log_alpha(np.arange(1, N + 1) / N), atol=5e-6, rtol=0)
    same = DiscreteVPSchedule(alphas_cumprod=ns.alphas_cumprod)
    np.testing.assert_allclose(same.log_alpha_knots, ns.log_alpha_knots, atol=5e-6, rtol=0)
    ac = ns.discrete_alphas_cumprod()
    assert ac.shape == (N + 1,) and ac[0] == 1.0
    np.testing.assert_allclose(np.log(ac[1:]) / 2, ref_log_alpha(np.arange(1, N + 1) / N), rtol=1e-12)


def test_continuous_view_matches_float64(ns):
    t = np.concatenate([np.random.RandomState(0).uniform(1.0 / N, 1.0, 500), ns.t_knots[::97], [1.0 / N, 1.0],
                        [0.0, 0.0004, 1.0005]]).astype(np.float32)  # the last three: linear extrapolation
    la = ref_log_alpha(t)
    np.testing.assert_allclose(np.asarray(ns.marginal_log_mean_coeff(t)), la, atol=5e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(ns.marginal_alpha(t)), np.exp(la), rtol=5e-6)
    t, la = t[(t >= 1.0 / N) & (t <= 1.0)], la[(t >= 1.0 / N) & (t <= 1.0)]  # sigma needs alpha < 1
    # sigma = sqrt(1 - exp(2 log alpha)) in float32 (the original's formula) loses digits near t = 1/N.
    np.testing.assert_allclose(np.asarray(ns.marginal_std(t)), np.sqrt(-np.expm1(2 * la)), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ns.marginal_lambda(t)), ref_lambda(t), atol=1e-4, rtol=0)
    # A knot interpolates exactly to its own value.
    np.testing.assert_array_equal(np.asarray(ns.marginal_log_mean_coeff(ns.t_knots)), ns.log_alpha_knots)


def test_inverse_lambda(ns):
    t = np.linspace(1.0 / N, 1.0, 337).astype(np.float32)
    lam = np.asarray(ns.marginal_lambda(t))
    np.testing.assert_allclose(np.asarray(ns.inverse_lambda(lam)), t, atol=2e-6, rtol=0)
    # float64 inversion of the float64 schedule at the same lambdas.
    grid = np.linspace(1.0 / N, 1.0, 200001)
    ref_t = np.interp(lam.astype(np.float64), ref_lambda(grid)[::-1], grid[::-1])
    np.testing.assert_allclose(np.asarray(ns.inverse_lambda(lam)), ref_t, atol=5e-6, rtol=0)


def test_interpolate_extends_outer_segments():
    xp, yp = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0, 3.0])
    np.testing.assert_allclose(np.asarray(interpolate(np.array([-1.0, 0.5, 1.0, 2.0, 5.0]), xp, yp)),
                               [-2.0, 1.0, 2.0, 2.5, 4.0], rtol=1e-6)


def test_model_time(ns):
    # The U-ViT network takes t * N: t = 1 -> 1000, t = 1/N -> 1.
    np.testing.assert_array_equal(np.asarray(ns.model_time(np.float32([1.0, 0.5, 0.001]))), [1000.0, 500.0, 1.0])


def test_bad_schedules():
    with pytest.raises(ConfigError):
        DiscreteVPSchedule()
    with pytest.raises(ConfigError):
        DiscreteVPSchedule(betas=np.array([0.1, 1.5]))
    with pytest.raises(ConfigError):
        DiscreteVPSchedule(alphas_cumprod=np.array([0.5, 0.9]))


# ---------------------------------------------------------------------------- time grids
def test_time_uniform_matches_fixture(ns):
    ref = np.load(fixture_path("uvit", "uvit_tiny_io.npz"))["solver_timesteps"]
    steps = DPMSolver(ns).plan(10, 2, "singlestep", "time_uniform")
    got = np.array([s.s for s in steps] + [steps[-1].t], dtype=np.float32)
    np.testing.assert_array_equal(got, ref)
    assert all(s.order == 2 for s in steps)


def test_time_grids(ns):
    sol = DPMSolver(ns)
    lam = np.asarray(ns.marginal_lambda(sol.time_steps("logSNR", 1.0, 1e-3, 8)))
    np.testing.assert_allclose(np.diff(lam), np.full(8, (lam[-1] - lam[0]) / 8), atol=2e-4)
    q = sol.time_steps("time_quadratic", 1.0, 1e-3, 5)
    assert q[0] == np.float32(1.0) and q.shape == (6,)
    np.testing.assert_allclose(np.sqrt(q), np.linspace(1.0, np.sqrt(1e-3), 6), atol=1e-6)


def test_plans(ns):
    sol = DPMSolver(ns)
    assert len(sol.plan(20, 2)) == 10 and len(sol.plan(9, 3)) == 3
    with pytest.raises(ConfigError, match="multiple of 2"):
        sol.plan(11, 2)
    # Multistep: first step order 1; below 10 steps the last step drops to order 1 (lower_order_final).
    assert [s.order for s in sol.plan(5, 2, "multistep")] == [1, 2, 2, 2, 1]
    assert [s.order for s in sol.plan(12, 2, "multistep")] == [1] + [2] * 11
    with pytest.raises(ConfigError):
        sol.plan(10, 3, "multistep")
    with pytest.raises(ConfigError):
        sol.plan(10, 2, skip_type="bogus")


# ---------------------------------------------------------------------------- convergence
# Data x0 ~ N(mu, s0^2) per dimension: the exact noise predictor is known and the
# probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s0^2 + sigma_t^2) fixed.
MU, S0, T0 = 1.0, 0.5, 1e-3


def analytic_eps(ns):
    def eps(x, t, slot):
        a, s = ns.marginal_alpha(t), ns.marginal_std(t)
        return s * (x - a * MU) / (a * a * S0 * S0 + s * s)
    return eps


_SOLVERS = {}


def solver_for(ns, predict_x0, solver_type):
    """One solver and one model function per variant, so their compiled steps are reused across tests."""
    key = (id(ns), predict_x0, solver_type)
    if key not in _SOLVERS:
        _SOLVERS[key] = (DPMSolver(ns, predict_x0=predict_x0, solver_type=solver_type), analytic_eps(ns))
    return _SOLVERS[key]


def exact_solution(ns, x_T, t_0):
    a_T, a_0 = (float(jnp.exp(ns.marginal_log_mean_coeff(jnp.float32(t)))) for t in (1.0, t_0))
    v_T, v_0 = a_T ** 2 * S0 ** 2 + 1 - a_T ** 2, a_0 ** 2 * S0 ** 2 + 1 - a_0 ** 2
    return a_0 * MU + np.sqrt(v_0) * (np.asarray(x_T, np.float64) - a_T * MU) / np.sqrt(v_T)


@pytest.fixture(scope="module")
def x_T():
    return np.random.RandomState(0).randn(64).astype(np.float32)


def errors(ns, x_T, predict_x0, order, method, steps, solver_type="dpm_solver"):
    sol, eps = solver_for(ns, predict_x0, solver_type)
    ref = exact_solution(ns, x_T, T0)
    out = []
    for n in steps:
        nfe = n * order if method == "singlestep" else n
        x = sol.sample(eps, x_T, nfe, order, method, "logSNR", t_0=T0)
        out.append(np.abs(np.asarray(x, np.float64) - ref).max())
    return np.array(out)


@pytest.mark.parametrize("predict_x0,order", [(True, 1), (True, 2), (False, 1), (False, 2), (False, 3)])
def test_singlestep_convergence_order(ns, x_T, predict_x0, order):
    err = errors(ns, x_T, predict_x0, order, "singlestep", (8, 16, 32))
    rates = np.log2(err[:-1] / err[1:])
    assert (rates > order - 0.25).all() and (rates < order + 0.5).all(), (err, rates)


def test_singlestep_third_order_data_prediction(ns, x_T):
    # DPM-Solver++3S's error constant changes sign along the path here, so the
    # rate between neighbouring step counts wobbles; over 8 -> 32 steps it is
    # well above second order, and it beats DPM-Solver++2S by far.
    err3 = errors(ns, x_T, True, 3, "singlestep", (8, 32))
    err2 = errors(ns, x_T, True, 2, "singlestep", (8, 32))
    assert np.log2(err3[0] / err3[1]) / 2 > 2.2, err3
    assert (err3 < err2 / 50).all(), (err3, err2)


@pytest.mark.parametrize("solver_type", ["dpm_solver", "taylor"])
def test_multistep_2m_convergence(ns, x_T, solver_type):
    err = errors(ns, x_T, True, 2, "multistep", (12, 24, 48), solver_type)
    rates = np.log2(err[:-1] / err[1:])
    assert (rates > 1.7).all() and (rates < 2.5).all(), (err, rates)


def test_taylor_second_order(ns, x_T):
    err = errors(ns, x_T, True, 2, "singlestep", (8, 16, 32), "taylor")
    rates = np.log2(err[:-1] / err[1:])
    assert (rates > 1.75).all() and (rates < 2.5).all(), (err, rates)


def test_slots_passed_to_model(ns):
    seen = []

    def eps(x, t, slot):
        seen.append(slot)
        return analytic_eps(ns)(x, t, slot)

    DPMSolver(ns).sample(eps, np.zeros(3, np.float32), 6, 3, jit=False)
    assert seen == [0, 1, 2, 0, 1, 2]
