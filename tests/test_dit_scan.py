"""The compile-once (scan + cond) DiT and the ahead-of-time static sampler against the static path and the fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, rel_err
from l2c_jax import ConfigError
from l2c_jax.compile_cache import enable_compilation_cache
from l2c_jax.models.dit_scan import ScanModel, cache_from_tuple, cache_to_tuple, scan_apply, split_block_params
from l2c_jax.sampling.strategies import STRATEGIES, ScanDiTSampler, StaticDiTSampler, default_strategy, make_sampler
from l2c_jax.sampling import DiTSampler


FAMILY = "dit"  # the reference fixtures behind io / model / router (conftest)


def test_stacked_params_round_trip(model):
    rest, blocks = split_block_params(model.params, model.config.depth)
    assert not any(k.startswith("blocks_") for k in rest)
    w = 6 * model.config.hidden_size
    for i in range(model.config.depth):
        bp = model.params[f"blocks_{i}"]
        for name in ("attn", "mlp"):
            leaves_i = jax.tree_util.tree_leaves(bp[name])
            leaves_s = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[i], blocks[name]))
            for a, b in zip(leaves_i, leaves_s):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        ada = blocks["adaLN_modulation_1"]
        np.testing.assert_array_equal(np.asarray(ada["kernel"][:, i * w:(i + 1) * w]),
                                      np.asarray(bp["adaLN_modulation_1"]["kernel"]))
        np.testing.assert_array_equal(np.asarray(ada["bias"][i * w:(i + 1) * w]),
                                      np.asarray(bp["adaLN_modulation_1"]["bias"]))
    # shapes only: works on abstract trees too
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params)
    _, ablocks = split_block_params(abstract, model.config.depth)
    assert ablocks["mlp"]["fc1"]["kernel"].shape[0] == model.config.depth


def test_forward_matches_original(model, io):
    sm = ScanModel(model)
    out, cache = jax.jit(sm.apply)(sm.params, nhwc(io["x"]), io["t"], io["y"])
    np.testing.assert_allclose(np.asarray(out), io["forward"].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
    assert cache.shape == (8, 4, 16, 64)


def test_cache_and_mask_match_static_path(model, io):
    """Same outputs and caches as the static path for a mixed mask, with the mask traced."""
    sm = ScanModel(model)
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache_t = model(x, t, y)
    mask = (True, False, False, True, True, True, False, False)
    ref_out, ref_cache = model(x * 0.5, t + 3, y, cache=cache_t, mask=mask)
    f = jax.jit(lambda p, c, m: scan_apply(model.config, p, x * 0.5, t + 3, y, c, m))
    out, cache = f(sm.params, cache_from_tuple(cache_t), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    for a, b in zip(cache_to_tuple(cache), ref_cache):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # a reused unit returns its cached value exactly
    np.testing.assert_array_equal(np.asarray(cache[1]), np.asarray(cache_t[1]))
    # the tuple form of the cache is accepted as well
    out2, _ = f(sm.params, cache_t, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


def test_beta_interpolation_matches_static_path(model, io):
    sm = ScanModel(model)
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache_t = model(x, t, y)
    beta = jnp.linspace(0.1, 0.9, 8)
    ref_out, _ = model.apply(model.params, x * 0.9, t, y, cache_t, None, beta)
    out, _ = scan_apply(model.config, sm.params, x * 0.9, t, y, cache_t, None, beta)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    g = jax.grad(lambda b: scan_apply(model.config, sm.params, x, t, y, cache_t, None, b)[0].sum())(beta)
    assert g.shape == (8,) and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("stacked", [True, False])
def test_one_graph_for_every_mask(model, io, stacked):
    sm = ScanModel(model, stacked=stacked)
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    f = jax.jit(lambda p, c, m: scan_apply(model.config, p, x, t, y, c, m))
    cache = jnp.zeros((8, 4, 16, 64))
    for m in ([True] * 8, [False] * 8, [True, False] * 4):
        f(sm.params, cache, jnp.asarray(m))
    assert f._cache_size() == 1


@pytest.mark.parametrize("strategy", ["scan", "cond", "static"])
def test_ddim_l2c_matches_original(strategy, model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(float(io["l2c_threshold"]))
    s = make_sampler(model, 10, strategy, cfg_scale=4.0)
    assert s.strategy == strategy
    out = s(noise, io["ddim_y"][:2], masks)
    assert rel_err(out, io["ddim_l2c"].transpose(0, 2, 3, 1)[:2]) < 1e-4
    full = s(noise, io["ddim_y"][:2])
    assert rel_err(full, io["ddim_full"].transpose(0, 2, 3, 1)[:2]) < 1e-4


def test_ahead_of_time_compile_covers_the_schedule(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(0.5)
    static = StaticDiTSampler(model, 10, cfg_scale=4.0)
    distinct = {tuple(m) for m in masks if not all(m)}
    stats = static.compile(2, masks, workers=2)
    assert stats["graphs"] == len(static.step_keys(masks)) == len(distinct) + 1
    assert static.compile(2, masks)["graphs"] == 0  # already compiled
    n_jit = len(static._compiled)
    out = static(noise, io["ddim_y"][:2], masks)
    assert len(static._compiled) == n_jit  # sampling ran the compiled executables, no new graph
    scan = ScanDiTSampler(model, 10, cfg_scale=4.0)
    assert scan.compile(2, masks)["graphs"] == 1 and scan.compile(2, None)["graphs"] == 0
    assert rel_err(scan(noise, io["ddim_y"][:2], masks), np.asarray(out)) < 1e-5
    ref = DiTSampler(model, 10, cfg_scale=4.0)(noise, io["ddim_y"][:2], masks)
    assert rel_err(out, np.asarray(ref)) < 1e-6


def test_bfloat16_scan_runs_close_to_float32(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(0.5)
    ref = ScanDiTSampler(model, 10, cfg_scale=4.0)(noise, io["ddim_y"][:2], masks)
    out = ScanDiTSampler(model, 10, cfg_scale=4.0, dtype=jnp.bfloat16, cast_params=True)(noise, io["ddim_y"][:2], masks)
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, np.asarray(ref)) < 0.1


def test_strategy_selection_and_errors(model):
    assert isinstance(make_sampler(model, 10, "static"), StaticDiTSampler)
    assert isinstance(make_sampler(model, 10, "scan"), ScanDiTSampler)
    assert make_sampler(model, 10, "cond").strategy == "cond"
    assert default_strategy("cpu") in STRATEGIES and default_strategy("gpu") in STRATEGIES
    with pytest.raises(ConfigError, match="strategy"):
        make_sampler(model, 10, "eager")
    sm = ScanModel(model)
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ConfigError, match="cacheable sub-layers"):
        scan_apply(model.config, sm.params, x, jnp.zeros(1, int), jnp.zeros(1, int), None, jnp.ones(5, bool))
    with pytest.raises(ConfigError, match="cache has shape"):
        scan_apply(model.config, sm.params, x, jnp.zeros(1, int), jnp.zeros(1, int), jnp.zeros((8, 2, 16, 64)))


def test_enable_compilation_cache(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache("") is None
        d = enable_compilation_cache(str(tmp_path / "xla"))
        assert d == str(tmp_path / "xla") and jax.config.jax_compilation_cache_dir == d
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
