"""The two execution strategies through the one model definition: a static mask (a graph per mask) and a
traced mask (one graph, units behind lax.cond), against each other and the original's fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc, rel_err
from l2c_jax import ConfigError
from l2c_jax.compile_cache import enable_compilation_cache
from l2c_jax.model import Model
from l2c_jax.models.uvit import UViTConfig
from l2c_jax.parallel import cast_floating
from l2c_jax.sampling import DiTSampler, UViTSampler, resolve_strategy, STRATEGIES

FAMILY = "dit"  # the reference fixtures behind io / model / router (conftest)
MASK = (True, False, False, True, True, True, False, False)


def test_traced_mask_matches_static_mask(model, io):
    """Same outputs and caches for a mixed mask, static or traced; a reused unit is its cached value exactly."""
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache_t = model(x, t, y)
    ref_out, ref_cache = model(x * 0.5, t + 3, y, cache=cache_t, mask=MASK)
    out, cache = model(x * 0.5, t + 3, y, cache=cache_t, mask=jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    for a, b in zip(cache, ref_cache):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache[1]), np.asarray(cache_t[1]))


def test_forward_with_all_true_traced_mask_matches_original(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache = model(x, t, y)
    zeros = tuple(jnp.zeros_like(c) for c in cache)
    out, _ = model(x, t, y, cache=zeros, mask=jnp.ones(8, bool))
    np.testing.assert_allclose(np.asarray(out), io["forward"].transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_beta_under_a_traced_mask(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    _, cache_t = model(x, t, y)
    beta = jnp.linspace(0.1, 0.9, 8)
    ref_out, _ = model.apply(model.params, x * 0.9, t, y, cache_t, None, beta)
    out, _ = model.apply(model.params, x * 0.9, t, y, cache_t, jnp.ones(8, bool), beta)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
    g = jax.grad(lambda b: model.apply(model.params, x, t, y, cache_t, jnp.asarray(MASK), b)[0].sum())(beta)
    assert g.shape == (8,) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~np.asarray(MASK)] == 0)  # a reused unit does not see beta


def test_one_graph_for_every_mask(model, io):
    x, t, y = nhwc(io["x"]), io["t"], io["y"]
    f = jax.jit(lambda p, c, m: model.apply(p, x, t, y, c, m))
    cache = tuple(jnp.zeros((4, 16, 64)) for _ in range(8))
    for m in ([True] * 8, [False] * 8, [True, False] * 4):
        f(model.params, cache, jnp.asarray(m))
    assert f._cache_size() == 1


@pytest.mark.parametrize("strategy", ["cond", "static"])
def test_ddim_l2c_matches_original(strategy, model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(float(io["l2c_threshold"]))
    s = DiTSampler(model, 10, cfg_scale=4.0, strategy=strategy)
    assert s.strategy == strategy
    out = s(noise, io["ddim_y"][:2], masks)
    assert rel_err(out, io["ddim_l2c"].transpose(0, 2, 3, 1)[:2]) < 1e-4
    full = s(noise, io["ddim_y"][:2])
    assert rel_err(full, io["ddim_full"].transpose(0, 2, 3, 1)[:2]) < 1e-4


def test_ahead_of_time_compile_covers_the_schedule(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(0.5)
    static = DiTSampler(model, 10, cfg_scale=4.0)
    distinct = {tuple(m) for m in masks if not all(m)}
    stats = static.compile(2, masks, workers=2)
    assert stats["graphs"] == len(static.step_keys(masks)) == len(distinct) + 1
    assert static.compile(2, masks)["graphs"] == 0  # already compiled
    fns = {k: static.function(k) for k in static.step_keys(masks)}
    out = static(noise, io["ddim_y"][:2], masks)
    assert all(f._cache_size() == 0 for f in fns.values())  # sampling ran the compiled executables only
    cond = DiTSampler(model, 10, cfg_scale=4.0, strategy="cond")
    assert cond.compile(2, masks)["graphs"] == 1 and cond.compile(2, None)["graphs"] == 0
    assert rel_err(cond(noise, io["ddim_y"][:2], masks), np.asarray(out)) < 1e-5
    ref = DiTSampler(model, 10, cfg_scale=4.0)(noise, io["ddim_y"][:2], masks)
    assert rel_err(out, np.asarray(ref)) < 1e-6
    full = DiTSampler(model, 10, cfg_scale=4.0)(noise, io["ddim_y"][:2])
    assert rel_err(out, np.asarray(full)) > 1e-4  # the masks were applied, not ignored


def test_bfloat16_cond_runs_close_to_float32(model, router, io):
    noise = io["ddim_noise"].transpose(0, 2, 3, 1)[:2]
    masks = router.masks(0.5)
    ref = DiTSampler(model, 10, cfg_scale=4.0, strategy="cond")(noise, io["ddim_y"][:2], masks)
    typed = Model(model.family, model.config, cast_floating(model.params, jnp.bfloat16), dtype=jnp.bfloat16)
    out = DiTSampler(typed, 10, cfg_scale=4.0, strategy="cond")(noise, io["ddim_y"][:2], masks)
    assert out.dtype == jnp.float32
    assert 0 < rel_err(out, np.asarray(ref)) < 0.1


def test_uvit_cond_matches_static():
    cfg = UViTConfig(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=3, num_heads=2, num_classes=11)
    model = Model.random("uvit", cfg, seed=3)
    noise = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    y = jnp.array([1, 5])
    masks = np.ones((10, model.num_units), bool)
    masks[2::2, 1::2] = False
    outs = {}
    for batch_cfg in (True, False):
        for strategy in STRATEGIES:
            s = UViTSampler(model, 10, cfg_scale=0.4, batch_cfg=batch_cfg, strategy=strategy)
            if batch_cfg:
                assert s.compile(2, masks)["graphs"] == len(s.step_keys(masks))
            outs[batch_cfg, strategy] = np.asarray(s(noise, y, masks))
    ref = outs[True, "static"]
    for k, v in outs.items():
        assert rel_err(v, ref) < 1e-5, k
    # The masks changed the result: every strategy really reused (agreeing by ignoring them would pass above).
    full = np.asarray(UViTSampler(model, 10, cfg_scale=0.4)(noise, y))
    assert rel_err(full, ref) > 1e-4


def test_strategy_selection_and_errors(model):
    assert DiTSampler(model, 10).strategy == "static"
    assert resolve_strategy("auto", "cpu") == resolve_strategy("auto", "gpu") == "cond"
    assert resolve_strategy("auto", "tpu") == "static"  # not measured there
    with pytest.raises(ConfigError, match="strategy"):
        DiTSampler(model, 10, strategy="eager")
    with pytest.raises(ConfigError, match="removed"):
        resolve_strategy("scan")
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ConfigError, match="cacheable sub-layers"):
        model.apply(model.params, x, jnp.zeros(1, int), jnp.zeros(1, int), None, jnp.ones(5, bool))
    with pytest.raises(ConfigError, match="no cache"):
        model.apply(model.params, x, jnp.zeros(1, int), jnp.zeros(1, int), None, jnp.ones(8, bool))


def test_enable_compilation_cache(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        assert enable_compilation_cache("") is None
        d = enable_compilation_cache(str(tmp_path / "xla"))
        assert d == str(tmp_path / "xla") and jax.config.jax_compilation_cache_dir == d
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
