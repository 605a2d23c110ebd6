"""U-ViT sampling (DPM-Solver-2, CFG, the learned cache) against the original PyTorch run, call by call."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, rel_err
from l2c_jax import ConfigError
from l2c_jax.diffusion.dpm_solver import DPMSolver
from l2c_jax.sampling.uvit import UViTSampler, sample_uvit


FAMILY = "uvit"  # the reference fixtures behind io / model / router (conftest)


@pytest.fixture(scope="module")
def masks(io, router):
    assert router.kind == "uvit-dpm2" and router.steps == int(io["dpm_nfe"])
    return router.masks(float(io["l2c_threshold"]))


def test_router_masks_match_fixture(io, masks):
    np.testing.assert_array_equal(masks, io["l2c_masks"])
    assert masks[0].all() and not masks[1:].all()  # the cached run really reuses sub-layers


def test_full_matches_original(model, io):
    out = sample_uvit(model, nhwc(io["dpm_noise"]), io["dpm_y"], steps=int(io["dpm_nfe"]),
                      cfg_scale=float(io["dpm_cfg_scale"]))
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    assert rel_err(out, nhwc(io["dpm_full"])) < 1e-4


def test_l2c_matches_original_call_by_call(model, io, masks):
    sampler = UViTSampler(model, int(io["dpm_nfe"]), cfg_scale=float(io["dpm_cfg_scale"]))
    assert sampler.num_steps == 5
    np.testing.assert_array_equal(sampler.timesteps(), io["solver_timesteps"])
    trace = []
    out = sampler(nhwc(io["dpm_noise"]), io["dpm_y"], masks=masks, trace=trace)
    ref = nhwc(io["dpm_l2c"])
    assert rel_err(out, ref) < 1e-4
    # The fixture's cached and full runs are far apart, so the comparison above checks the cache schedule.
    assert rel_err(io["dpm_full"], io["dpm_l2c"]) > 1e-2

    assert len(trace) == len(io["l2c_calls_x"]) == 20  # 5 steps x 2 evaluations x (cond, uncond)
    for i, call in enumerate(trace):
        assert rel_err(call["x"], nhwc(io["l2c_calls_x"][i])) < 1e-4, f"call {i}: x"
        np.testing.assert_allclose(call["t"], io["l2c_calls_t"][i], rtol=1e-6, err_msg=f"call {i}: t")
        np.testing.assert_array_equal(call["y"], io["l2c_calls_y"][i], err_msg=f"call {i}: y")
        assert rel_err(call["out"], nhwc(io["l2c_calls_out"][i])) < 1e-4, f"call {i}: out"
    # One compiled evaluation per distinct (mask, keep-the-cache) pair, shared across steps: the
    # first evaluation of each step with its mask, the midpoints full (keeping the cache but at the end).
    norm = [None if m.all() else tuple(bool(v) for v in m) for m in masks]
    keys = {(m, False) for m in norm} | {(None, k + 1 < len(masks)) for k in range(len(masks))}
    assert {key[:2] for key in sampler._compiled} == keys and len(sampler._compiled) == len(keys) == 6


def test_time_input_convention(io):
    # The network sees continuous time x 1000: 1000 at t = 1; the midpoint of step 0 lies between.
    t = io["l2c_calls_t"]
    np.testing.assert_array_equal(t[0], [1000.0, 1000.0])
    assert 800.2 < t[2][0] < 1000.0


@pytest.mark.slow
def test_separate_cfg_calls_equal_batched(model, io):
    """batch_cfg=False (the original's two calls, two cache pytrees) gives the batched run's results and calls."""
    noise, y = nhwc(io["dpm_noise"]), io["dpm_y"]
    m = np.ones((2, 10), bool)
    m[1] = io["l2c_masks"][1]
    runs = []
    for batch_cfg in (True, False):
        trace = []
        out = UViTSampler(model, 4, cfg_scale=0.4, batch_cfg=batch_cfg)(noise, y, masks=m, trace=trace)
        runs.append((np.asarray(out), trace))
    (a, ta), (b, tb) = runs
    assert rel_err(b, a) < 1e-5 and len(ta) == len(tb) == 8
    for ca, cb in zip(ta, tb):
        np.testing.assert_array_equal(ca["y"], cb["y"])
        assert rel_err(cb["out"], ca["out"]) < 1e-5


def test_unconditional_model_and_other_solvers(conv_model):
    """No CFG for an unconditional model; other solvers run through the same loop as `DPMSolver.sample`."""
    noise = np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32)
    params = conv_model.params

    def eps(x, t, slot):
        tm = jnp.broadcast_to(t * 1000.0, (x.shape[0],))
        return conv_model.apply(params, x, tm, None)[0]

    trace = []
    out3 = UViTSampler(conv_model, 3, solver="dpm_solver3")(noise, None, trace=trace)
    assert len(trace) == 3 and all(c["y"] is None for c in trace) and trace[0]["t"][0] == 1000.0
    assert np.isfinite(np.asarray(out3)).all()

    # NFE 3 multistep runs orders 1, 2, 1 (lower order at the end below 10 steps).
    sampler = UViTSampler(conv_model, 3, solver="dpm_solver2m")
    out = sampler(noise, None)
    ref = DPMSolver(sampler.schedule).sample(eps, noise, 3, 2, "multistep")
    assert rel_err(out, np.asarray(ref)) < 1e-5

    # Masks apply to the first evaluation of each step for every solver; all-True masks change nothing.
    np.testing.assert_array_equal(np.asarray(sampler(noise, None, masks=np.ones((3, 10), bool))), np.asarray(out))
    m = np.ones((3, 10), bool)
    m[2, ::2] = False  # step 2 reuses every attention branch of step 1's evaluation
    cached = sampler(noise, None, masks=m)
    assert 0 < rel_err(cached, np.asarray(out)) < 0.5


def test_errors(model, conv_model, io):
    noise, y = nhwc(io["dpm_noise"]), io["dpm_y"]
    with pytest.raises(ConfigError, match="multiple of 2"):
        UViTSampler(model, 9, cfg_scale=0.4)
    with pytest.raises(ConfigError, match="unconditional"):
        UViTSampler(conv_model, 4, cfg_scale=0.4)
    with pytest.raises(ConfigError, match="unknown U-ViT solver"):
        UViTSampler(model, 4, solver="ddim")
    sampler = UViTSampler(model, 4, cfg_scale=0.4)
    with pytest.raises(ConfigError, match="shape"):
        sampler(noise, y, masks=np.ones((5, 10), bool))
    bad = np.ones((2, 10), bool)
    bad[0, 3] = False
    with pytest.raises(ConfigError, match="first solver step"):
        sampler(noise, y, masks=bad)
    with pytest.raises(ConfigError, match="pass labels"):
        sampler(noise, None)
    with pytest.raises(ConfigError, match="labels must lie"):
        sampler(noise, np.array([0, 11]))
    with pytest.raises(ConfigError, match="noise has shape"):
        sampler(noise[..., :3], y)
    with pytest.raises(ConfigError, match="y=None"):
        UViTSampler(conv_model, 4)(noise, y)
