"""The digits U-ViT under the methods harness: per-evaluation schedules of every copy method, its routers,
and the U-ViT objective that trained it."""

import json

import numpy as np
import pytest

from conftest import computed_units
from l2c_jax.errors import ConfigError
from l2c_jax.methods import METHODS, Context, make_schedule, unit_changes

NFE = 20
SETTINGS = dict(full=None, l2c=None, fora=3, delta_dit=6, deepcache=3, smoothcache=0.2, error_ranked="l2c",
                random=0, fewer_steps=8)


@pytest.fixture(scope="module")
def digits_uvit():
    from l2c_jax.model import load_model
    from l2c_jax.pipelines import sample_noise
    from l2c_jax.resources import asset
    from l2c_jax.sampling import calibration_labels, resolve_schedule, sampler_for

    model = load_model(asset("digits", "uvit"))
    cfg = model.config
    noise = sample_noise(0, np.arange(6), (cfg.input_size, cfg.input_size, cfg.in_channels))
    y = calibration_labels(cfg, 6)

    def sampler(k, strategy="cond"):
        return sampler_for(model, "dpm_solver2", k, False, strategy)

    router = asset("digits", f"router_uvit_dpm{NFE}.safetensors")
    changes = unit_changes(sampler(NFE), noise, y)
    ctx = Context(num_units=model.num_units, steps=NFE, changes=lambda: changes,
                  router_schedule=lambda name, thr: resolve_schedule(model, sampler(NFE), router=router,
                                                                     threshold=thr))
    return model, ctx, sampler, noise, y


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_each_copy_method_computes_on_the_uvit_exactly_the_share_it_reports(digits_uvit, method):
    model, ctx, sampler, noise, y = digits_uvit
    sched = make_schedule(ctx, method, SETTINGS[method])
    smp = sampler(sched.steps)
    if method == "fewer_steps":
        assert sched.masks is None and sched.computed_share == 8 / NFE
        return
    if method == "full":
        assert sched.masks is None and sched.computed_share == 1.0
        assert computed_units(smp, sched, noise, y).all()
        return
    # One row per model evaluation (a router's per-solver-step rows expanded: its midpoints compute).
    assert sched.masks.shape == (NFE, model.num_units)
    assert sched.computed_share == pytest.approx(smp.computed_share(sched.masks))
    computed = computed_units(smp, sched, noise, y)
    np.testing.assert_array_equal(computed, sched.masks)
    assert 0 < sched.computed_share < 1 and sched.masks[0].all()
    if method == "l2c":
        assert sched.masks[1::2].all()  # DPM-Solver-2's midpoint evaluations never reuse


def test_taylorseer_on_a_uvit_is_refused_in_one_line(digits_uvit):
    from l2c_jax.sampling import resolve_schedule

    model, _, sampler, *_ = digits_uvit
    with pytest.raises(ConfigError, match="taylorseer forecasts") as e:
        resolve_schedule(model, sampler(NFE), "taylorseer:3/2")
    assert "\n" not in str(e.value)
    assert set(SETTINGS) | {"taylorseer"} == set(METHODS)  # every other method is covered above


def test_the_harness_runs_the_uvit_side_by_side(tmp_path):
    from l2c_jax.compare_methods import run_methods
    from l2c_jax.configs import methods_digits

    c = methods_digits.get_config("uvit_quick")
    c.steps = (NFE,)
    c.only = "full,l2c,fora,fewer_steps"
    c.methods.l2c = ("-",)
    c.methods.fora = (2,)
    c.methods.fewer_steps = (0.5,)
    c.num_samples = 30
    c.repeats = 1
    rows = run_methods(c, str(tmp_path))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "l2c", "fora", "fewer_steps"}
    assert by["fewer_steps"]["steps"] == 10 and by["fewer_steps"]["computed_share"] == 0.5
    assert by["fora"]["computed_share"] == 0.5 and by["fora"]["flop_bound"] > 1.5
    assert 0 < by["l2c"]["computed_share"] < 1 and by["l2c"]["psnr_to_full"] > 20
    assert all(r["fid_mean"] is not None and np.isfinite(r["fid_mean"]) for r in rows)
    meta = json.load(open(tmp_path / "methods.json"))["meta"]
    assert meta["features"] == "digits"


def test_the_uvit_objective_trains_a_loadable_model(tmp_path):
    from l2c_jax.cli import parse_config_flags
    from l2c_jax.model import load_model
    from l2c_jax.training.train_dit import train_dit

    config, _ = parse_config_flags(["--config", "configs/digits_uvit.py:tiny"])
    out = train_dit(config, str(tmp_path / "run"), report=lambda *_: None)
    losses = [h["loss"] for h in out["history"]]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    model = load_model(out["model"])
    assert model.family == "uvit" and model.config.num_labels == 10


def test_uvit_flops_count_its_blocks_tokens_and_skips():
    from l2c_jax.bench.flops import fixed_flops, flop_bound, unit_flops
    from l2c_jax.models.uvit import UViTConfig

    cfg = UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=12, num_heads=4, num_classes=11)
    u = unit_flops(cfg)
    n, h = 16 + 2, 64  # 16 patches + the time and label tokens
    assert u.shape == (cfg.num_units,) == (26,)
    assert u[1] == 2 * 2 * n * h * 4 * h  # fc1 + fc2
    assert fixed_flops(cfg) >= 6 * 2 * n * 2 * h * h  # the six out blocks' skip projections at least
    masks = np.ones((20, 26), bool)
    masks[2::2, :] = False  # every first evaluation after the first reuses everything
    b = flop_bound(cfg, masks, 20)
    assert b["bound"] == pytest.approx(20 / 11) and 1 < b["bound_with_fixed"] < b["bound"]
