"""The caching methods on one harness: each schedule computes exactly the share it reports, budgets, forecasts."""

import json

import numpy as np
import pytest

from docs_blocks import run_block
from conftest import computed_units
from l2c_jax.errors import ConfigError
from l2c_jax.methods import METHODS, Context, make_schedule, unit_changes

STEPS = 20
SETTINGS = dict(full=None, l2c=None, fora=3, delta_dit=6, deepcache=3, smoothcache=0.2, error_ranked="l2c",
                random=0, fewer_steps=8, taylorseer="3/2")


@pytest.fixture(scope="module")
def digits():
    from l2c_jax.model import load_model
    from l2c_jax.pipelines import sample_noise
    from l2c_jax.resources import asset
    from l2c_jax.router import load_router
    from l2c_jax.sampling import sampler_for

    model = load_model(asset("digits", "dit"))
    router = load_router(asset("digits", f"router_ddim{STEPS}.safetensors"))
    cfg = model.config
    noise = sample_noise(0, np.arange(6), (cfg.input_size, cfg.input_size, cfg.in_channels))
    y = np.arange(6) % cfg.num_classes

    def sampler(k, strategy="static"):
        return sampler_for(model, "ddim", k, False, strategy, guidance_channels=None)

    from l2c_jax.schedule import from_router

    changes = unit_changes(sampler(STEPS), noise, y)
    ctx = Context(num_units=model.num_units, steps=STEPS, changes=lambda: changes,
                  router_schedule=lambda name, thr: from_router(router, kind="dit-ddim", num_units=model.num_units,
                                                                rows=STEPS, threshold=0.5 if thr is None else thr))
    return model, ctx, sampler, noise, y


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_schedule_computes_exactly_the_share_it_reports(digits, method):
    model, ctx, sampler, noise, y = digits
    sched = make_schedule(ctx, method, SETTINGS[method])
    assert sched.method == method
    # One graph with the masks as an argument: static graphs would compile once per distinct mask (every step
    # of `random`); that static and traced masks compute alike is test_strategies' business.
    smp = sampler(sched.steps, "cond")
    if method == "fewer_steps":
        assert sched.masks is None and sched.computed_share == 8 / STEPS
    else:
        assert sched.steps == STEPS and sched.computed_share == pytest.approx(smp.computed_share(sched.masks))
    if sched.forecast == "copy":  # forecasts change the reused values too: nothing to count there
        computed = computed_units(smp, sched, noise, y)
        assert computed.sum() == sched.computed() == round(sched.computed_share * STEPS * model.num_units)
        if sched.masks is not None:
            np.testing.assert_array_equal(computed, sched.masks)
    if method not in ("full", "fewer_steps"):
        assert 0 < sched.computed_share < 1 and sched.masks[0].all()


def test_random_and_error_ranked_meet_the_budget_of_l2c(digits):
    _, ctx, *_ = digits
    l2c_reused = int((~make_schedule(ctx, "l2c").masks).sum())
    assert l2c_reused == ctx.l2c_budget() > 0
    for method, setting in (("random", 0), ("random", 1), ("error_ranked", "l2c")):
        sched = make_schedule(ctx, method, setting)
        assert int((~sched.masks).sum()) == l2c_reused
    ranked = make_schedule(ctx, "error_ranked", "l2c").masks
    changes = ctx.changes()
    assert changes[~ranked].max() <= changes[1:][ranked[1:]].min()  # the least-changing pairs are reused
    assert make_schedule(ctx, "error_ranked", 0.5).computed_share == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ConfigError, match="unknown caching method"):
        make_schedule(ctx, "fastcache", 1)


@pytest.mark.slow
def test_forecasting_runs_the_same_under_both_strategies_and_beats_copying(digits):
    _, ctx, sampler, noise, y = digits
    sched = make_schedule(ctx, "taylorseer", "2/2")
    full = np.asarray(sampler(STEPS)(noise, y))
    static = np.asarray(sampler(STEPS)(noise, y, sched))
    again = np.asarray(sampler(STEPS)(noise, y, sched))
    cond = np.asarray(sampler(STEPS, "cond")(noise, y, sched))
    copied = np.asarray(sampler(STEPS)(noise, y, sched.masks))
    np.testing.assert_array_equal(static, again)
    np.testing.assert_allclose(cond, static, atol=1e-5)
    assert np.abs(static - full).mean() < 0.5 * np.abs(copied - full).mean()


@pytest.mark.slow
def test_compare_methods_writes_the_table_and_the_picture(tmp_path):
    # docs/methods.md's quick command as written (tests/docs_blocks.py), one setting per method
    run_block("methods_quick", tmp_path, append=(
        "--config.steps='(20,)' --config.num_samples=40 --config.seeds='(0,1)' --config.bfloat16_rows=False "
        "--config.calibration.num_samples=8 \"--config.methods.taylorseer=('3/2',)\" "
        "\"--config.methods.l2c=('-',)\" --config.methods.fora='(3,)' --config.methods.delta_dit='(6,)' "
        "--config.methods.deepcache='(3,)' --config.methods.smoothcache='(0.2,)' "
        "\"--config.methods.error_ranked=('l2c',)\" --config.methods.random='(0,)' "
        "--config.methods.fewer_steps='(0.5,)' --config.strategy=cond --workdir out"), timeout=900)
    tmp_path = tmp_path / "out"
    rows = json.load(open(tmp_path / "methods.json"))["rows"]
    methods = {row["method"] for row in rows}
    assert methods == set(METHODS)
    for row in rows:
        assert 0 < row["computed_share"] <= 1 and row["fid_mean"] > 0 and len(row["fid_seeds"]) == 2
        assert row["flop_bound"] >= 1 and row["speedup"] > 0
    full = next(row for row in rows if row["method"] == "full")
    assert full["computed_share"] == 1 and full["psnr_to_full"] == float("inf")
    # Forecasting rows: their history is counted, and measured again with it in bfloat16 (config.history_dtypes).
    ts = [row for row in rows if row["method"] == "taylorseer" and row["setting"] == "3/2"]
    assert [row["history_dtype"] for row in ts] == ["float32", "bfloat16"]
    assert 0 < ts[1]["history_bytes"] < ts[0]["history_bytes"] <= ts[0]["history_bytes_all_units"]
    assert all(row["history_bytes"] == 0 for row in rows if row["forecast"] == "copy")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    # Orderings the table must show, on PSNR to full (deterministic given the seeds; FID at 40 images is noise):
    by = {(row["method"], str(row["setting"]), row.get("history_dtype")): row for row in rows}
    l2c, rand = by["l2c", "-", None], by["random", "0", None]
    assert l2c["computed_share"] == rand["computed_share"] == by["error_ranked", "l2c", None]["computed_share"]
    assert l2c["psnr_to_full"] > rand["psnr_to_full"] + 3  # the learned schedule beats a random one of its budget
    fora, ts = by["fora", "3", None], by["taylorseer", "3/2", "float32"]
    assert fora["computed_share"] == ts["computed_share"] and ts["psnr_to_full"] > fora["psnr_to_full"] + 3
    half = by["fewer_steps", "10", None]  # whole steps dropped: the share is exact and the bound its inverse
    assert half["computed_share"] == 0.5 and half["flop_bound"] == pytest.approx(2.0)
    for row in rows:  # the paired gap is the per-seed difference to full, averaged
        assert row["fid_gap_mean"] == pytest.approx(np.mean(np.subtract(row["fid_seeds"], full["fid_seeds"])))


def test_the_l2c_row_samples_everything_the_router_holds():
    """A router with placed anchors and learned forecast coefficients becomes the l2c row with all of them (the
    harness once dropped the coefficients, sampling Taylor's instead), and a "ddimN:" knob runs at N only."""
    from l2c_jax.router import Router
    from l2c_jax.schedule import anchor_layout, from_router

    rng = np.random.default_rng(0)
    anchors = tuple(np.flatnonzero(anchor_layout("warp7^0.6@17", 20)).tolist())
    router = Router(rng.normal(size=(20, 24)).astype(np.float32), "dit-ddim", threshold=0.5, forecast="taylor2",
                    coefs=rng.normal(size=(20, 24, 2)).astype(np.float32), anchors=anchors)
    own = from_router(router, kind="dit-ddim", num_units=router.num_units, rows=20)
    ctx = Context(num_units=router.num_units, steps=20, changes=lambda: None,
                  router_schedule=lambda name, thr: own)
    row = make_schedule(ctx, "l2c")
    assert row.key() == own.key() and row.coefficients is not None
    np.testing.assert_array_equal(row.coefficients, own.coefficients)
    np.testing.assert_array_equal(np.flatnonzero(row.anchor_rows()), router.anchors)
    placed = make_schedule(ctx, "taylorseer", "warp7^0.6@17/2")
    np.testing.assert_array_equal(np.flatnonzero(placed.anchor_rows()), router.anchors)
    assert placed.computed_share == pytest.approx(7 / 20) and placed.coefficients is None

    from l2c_jax.compare_methods import _settings_at
    from l2c_jax.configs.methods_digits import get_config
    config = get_config()
    config.only = "taylorseer"
    assert ("taylorseer", "warp7^0.6@17/2") in _settings_at(config, 20)
    assert not [s for _, s in _settings_at(config, 50) if "warp7" in s]


def test_the_anchor_search_moves_anchors_to_where_the_error_is_lowest():
    """`taylorseer:searchC/2` places C full steps by a coordinate search on `ctx.error`: with an error that is
    lowest at a known layout, it finds that layout from its warped start, and the schedule computes there only."""
    from l2c_jax.methods import search_layout

    target = np.array([0, 6, 10, 13, 15, 17, 19])
    calls = []

    def error(schedule):
        calls.append(schedule)
        assert schedule.forecast == "taylor2" and (schedule.masks.all(1) == schedule.anchors).all()
        return float(((np.flatnonzero(schedule.anchors) - target) ** 2).sum())

    ctx = Context(num_units=24, steps=20, changes=lambda: None, router_schedule=None, error=error)
    np.testing.assert_array_equal(np.flatnonzero(search_layout(ctx, 7)), target)
    assert len(calls) < 60  # each layout is measured once
    placed = make_schedule(ctx, "taylorseer", "search7/2")
    np.testing.assert_array_equal(np.flatnonzero(placed.anchor_rows()), target)
    assert placed.forecast == "taylor2" and placed.computed_share == pytest.approx(7 / 20)
    for bad in ("search1/2", "search21/2"):
        with pytest.raises(ConfigError, match="anchor count"):
            make_schedule(ctx, "taylorseer", bad)
    with pytest.raises(ConfigError, match="calibration"):
        make_schedule(Context(num_units=24, steps=20, changes=lambda: None, router_schedule=None), "taylorseer",
                      "search7/2")


@pytest.mark.slow
def test_an_anchor_search_on_the_model_lowers_its_error_against_the_full_sampler(digits):
    """Through the one schedule path, on the digits model's own calibration noise: the searched layout comes
    closer to the full sampler's samples than the warped layouts it starts from."""
    from l2c_jax.methods import schedule_error
    from l2c_jax.pipelines import sample_noise
    from l2c_jax.sampling import resolve_schedule

    model, ctx, sampler, _, _ = digits
    searched = resolve_schedule(model, sampler(STEPS), "taylorseer:search5/2",
                                calibration=dict(seed=1000, search_samples=8))
    anchors = np.flatnonzero(searched.anchor_rows())
    assert len(anchors) == 5 and anchors[0] == 0 and searched.computed_share == pytest.approx(5 / 20)
    cfg = model.config
    error = schedule_error(sampler(STEPS), sample_noise(1000, np.arange(8), (cfg.input_size, cfg.input_size,
                                                                             cfg.in_channels)),
                           np.arange(8) % cfg.num_classes)
    start = min(error(make_schedule(ctx, "taylorseer", f"warp5^{p}@{last}/2")) for p in (0.5, 0.6, 0.8)
                for last in (STEPS - 2, STEPS - 4))
    assert error(searched) < start
