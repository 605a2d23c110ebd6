"""`l2c_jax.sample` as API.md states it: router paths, user schedules, compile once, weights placed once."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path, nhwc, reference_io, reference_model, reference_router, rel_err
from l2c_jax import ConfigError, load_model, sample
from l2c_jax.convert.dit import convert_dit

DIT_ROUTER = ("dit", "dit_tiny_router_ddim10.pt")
UVIT_ROUTER = ("uvit", "uvit_tiny_router_dpm10.pth")


def _dit_inputs():
    io = reference_io("dit")
    return io, nhwc(io["ddim_noise"])[:2], io["ddim_y"][:2]


def test_dit_router_path_matches_original():
    io, noise, y = _dit_inputs()
    model = reference_model("dit")
    thr = float(io["l2c_threshold"])
    out = sample(model, noise, y, steps=10, cfg_scale=4.0, router=fixture_path(*DIT_ROUTER), threshold=thr)
    assert rel_err(out, nhwc(io["ddim_l2c"])[:2]) < 1e-4
    # the same schedule given as masks of one's own
    own = sample(model, noise, y, steps=10, cfg_scale=4.0, masks=io["l2c_masks"])
    np.testing.assert_array_equal(np.asarray(own), np.asarray(out))


def test_uvit_router_path_and_per_evaluation_masks_match_original():
    io = reference_io("uvit")
    model = reference_model("uvit")
    noise, y = nhwc(io["dpm_noise"]), io["dpm_y"]
    nfe, scale, thr = int(io["dpm_nfe"]), float(io["dpm_cfg_scale"]), float(io["l2c_threshold"])
    out = sample(model, noise, y, solver="dpm_solver2", steps=nfe, cfg_scale=scale,
                 router=fixture_path(*UVIT_ROUTER), threshold=thr)
    assert rel_err(out, nhwc(io["dpm_l2c"])) < 1e-4
    # API.md's form: one row per model evaluation (NFE rows); the router's step rows sit at the
    # first evaluation of each DPM-Solver-2 step, the midpoint evaluations compute everything.
    per_eval = np.ones((nfe, model.num_units), bool)
    per_eval[0::2] = io["l2c_masks"]
    own = sample(model, noise, y, solver="dpm_solver2", steps=nfe, cfg_scale=scale, masks=per_eval)
    np.testing.assert_array_equal(np.asarray(own), np.asarray(out))
    # A schedule the router form cannot express (reuse at a midpoint evaluation) runs too, and differs.
    mid = np.ones((nfe, model.num_units), bool)
    mid[3, ::2] = False
    other = sample(model, noise, y, solver="dpm_solver2", steps=nfe, cfg_scale=scale, masks=mid)
    assert rel_err(other, nhwc(io["dpm_full"])) > 1e-6 and np.isfinite(np.asarray(other)).all()


def test_bad_schedules_and_arguments_are_one_line_errors():
    io, noise, y = _dit_inputs()
    model = reference_model("dit")
    with pytest.raises(ConfigError, match="shape"):
        sample(model, noise, y, steps=10, masks=np.ones((9, model.num_units), bool))
    first_reuses = np.ones((10, model.num_units), bool)
    first_reuses[0, 0] = False
    with pytest.raises(ConfigError, match="first sampler step"):
        sample(model, noise, y, steps=10, masks=first_reuses)
    with pytest.raises(ConfigError, match="not both"):
        sample(model, noise, y, steps=10, router=reference_router("dit"), masks=io["l2c_masks"])
    with pytest.raises(ConfigError, match="trained for 10 steps"):
        sample(model, noise, y, steps=20, router=fixture_path(*DIT_ROUTER), threshold=0.5)
    with pytest.raises(ConfigError, match="cannot drive"):
        sample(reference_model("uvit"), nhwc(reference_io("uvit")["dpm_noise"]), reference_io("uvit")["dpm_y"],
               solver="dpm_solver2", steps=10, router=reference_router("dit"), threshold=0.5)
    with pytest.raises(ConfigError, match="threshold applies to a router"):
        sample(model, noise, y, steps=10, threshold=0.5)


class _CompileCounter:
    """Counts tracings and backend compilations (jax.monitoring events) while active."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        self.active, self.events = False, []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kw):
        if self.active and name in self.EVENTS:
            self.events.append(name)

    def count(self, fn):
        self.events, self.active = [], True
        try:
            jax.block_until_ready(fn())
        finally:
            self.active = False
        return len(self.events)


@pytest.mark.parametrize("strategy", ["static", "cond"])
def test_second_call_and_new_cfg_scale_compile_nothing(strategy):
    io, noise, y = _dit_inputs()
    model = convert_dit(fixture_path("dit", "dit_tiny.pt"), num_heads=4)  # a model of its own: no cached samplers
    noise, y = jnp.asarray(noise), jnp.asarray(y)  # inputs already on the device, as a sampling loop has them
    router = fixture_path(*DIT_ROUTER)
    counter = _CompileCounter()
    run = lambda s: sample(model, noise, y, steps=10, cfg_scale=s, router=router, threshold=0.5,  # noqa: E731
                           strategy=strategy)
    assert counter.count(lambda: run(4.0)) > 0  # the first call does compile (the counter works)
    assert counter.count(lambda: run(4.0)) == 0
    assert counter.count(lambda: run(1.5)) == 0
    # and the scale really is applied, not baked in
    assert rel_err(run(1.5), run(4.0)) > 1e-3
    # U-ViT alike
    uio = reference_io("uvit")
    umodel = reference_model("uvit")
    un, uy = jnp.asarray(nhwc(uio["dpm_noise"])), jnp.asarray(uio["dpm_y"])
    urun = lambda s: sample(umodel, un, uy, solver="dpm_solver2", steps=10, cfg_scale=s,  # noqa: E731
                            router=fixture_path(*UVIT_ROUTER), threshold=0.5)
    counter.count(lambda: urun(0.4))
    assert counter.count(lambda: urun(0.4)) == 0
    assert counter.count(lambda: urun(2.0)) == 0


def test_samplers_live_as_long_as_the_model(tmp_path):
    model = convert_dit(fixture_path("dit", "dit_tiny.pt"), num_heads=4)
    model.save(str(tmp_path / "m"))
    model = load_model(str(tmp_path / "m"))
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(model.params))  # restored onto the device
    _, noise, y = _dit_inputs()
    sample(model, noise, y, steps=3, cfg_scale=4.0)
    assert len(model.samplers) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_noise_is_not_consumed_by_donation():
    _, noise, y = _dit_inputs()
    model = reference_model("dit")
    x = jnp.asarray(noise[:, :, :, :])
    a = sample(model, x, y, steps=4)  # no guidance: the first step's input is the caller's noise itself
    b = sample(model, x, y, steps=4)
    assert not x.is_deleted()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_feature_cache_stays_close():
    io, noise, y = _dit_inputs()
    model = reference_model("dit")
    kw = dict(steps=10, cfg_scale=4.0, masks=io["l2c_masks"])
    f32 = sample(model, noise, y, **kw)
    bf16 = sample(model, noise, y, cache_dtype="bfloat16", **kw)
    err = rel_err(bf16, f32)
    assert 0 < err < 2e-2  # the cache is rounded, and only the cache
