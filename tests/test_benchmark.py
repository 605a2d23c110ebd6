"""scripts/benchmark.py end to end on the tiny config: completion and the JSON row's shape (no timing assertions)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_path
from docs_blocks import run_block
from l2c_jax.bench.flops import flop_bound, unit_flops
from l2c_jax.bench.sampling import ROW_KEYS
from l2c_jax.models.dit import DiTConfig


def _run(tmp_path, *overrides):
    """docs/performance.md's smoke command as written (tests/docs_blocks.py), with these overrides."""
    import shlex
    out = tmp_path / "rows.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    r = run_block("bench_smoke", tmp_path, append=" ".join(shlex.quote(a) for a in (
        f"--config.output={out}", f"--config.compilation_cache_dir={tmp_path / 'xla'}", *overrides)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    return rows[0], r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["static", "cond"])
def test_tiny_benchmark_writes_a_complete_row(tmp_path, strategy):
    # Cold and warm compile (fresh processes) measured once, with static's several graphs.
    row, stdout = _run(tmp_path, f"--config.strategy={strategy}", "--config.repeats=1",
                       f"--config.measure_compile={strategy == 'static'}")
    assert set(ROW_KEYS) <= set(row)
    assert row["strategy"] == strategy and row["batch_size"] == 2 and row["dtype"] == "float32"
    for kind in ("full", "l2c"):
        assert row[kind]["n"] == 1 and len(row[kind]["times"]) == 1
        assert {"median", "min", "max"} <= set(row[kind])
    assert row["flop_bound"] >= 1.0 and row["bound_with_fixed"] >= 1.0
    assert 0 < row["computed_share"] < 1
    assert {"speedup", "speedup_over_bound"} <= set(row) and row["speedup"] > 0
    comp = row["compile"]
    assert "in_process_s" in comp and ({"cold_s", "warm_s", "graphs"} <= set(comp)) == (strategy == "static")
    if strategy == "static":  # cond's one graph: tests/test_strategies.py
        assert comp["graphs"] > 1
    assert row["memory"]["peak_rss_sampling_bytes"] > 0
    assert row["machine"]["cores"] >= 1 and row["machine"]["backend"]
    assert "speed-up" in stdout and "FLOP bound" in stdout and "ratio" in stdout
    # The values agree with each other, not only exist: the speed-up is the medians' ratio, its ratio to the
    # bound is that over the bound, a schedule that reuses has a bound above 1 that the fixed parts only lower.
    for kind in ("full", "l2c"):
        assert row[kind]["min"] <= row[kind]["median"] <= row[kind]["max"]
        assert row[kind]["times"][0] == pytest.approx(row[kind]["median"], abs=1e-3)  # times are rounded
    assert row["speedup"] == pytest.approx(row["full"]["median"] / row["l2c"]["median"])
    assert row["speedup_over_bound"] == pytest.approx(row["speedup"] / row["flop_bound"])
    assert 1.0 < row["bound_with_fixed"] <= row["flop_bound"]


@pytest.mark.slow
def test_tiny_benchmark_bfloat16_truncated_schedule_with_fixture_router(tmp_path):
    row, _ = _run(tmp_path, "--config.dtype=bfloat16", "--config.max_steps=4", "--config.measure_compile=False",
                  "--config.repeats=1", "--config.warmup=0",
                  f"--config.router.checkpoint={fixture_path('dit', 'dit_tiny_router_ddim10.pt')}")
    assert row["dtype"] == "bfloat16" and row["schedule_steps"] == 4 and row["steps"] == 10
    assert row["compile"].get("cold_s") is None
    dev = row["bf16_vs_f32"]
    assert set(dev) == {"l2c_rel_max", "l2c_rel_rms"} and np.isfinite(dev["l2c_rel_max"])


def test_flop_bound_counts_units_by_their_flops():
    cfg = DiTConfig.from_name("DiT-XL/2", input_size=32)
    u = unit_flops(cfg)
    assert u.shape == (56,) and u[1] > u[0] > 0  # an MLP costs more than an attention at 256 tokens
    masks = np.ones((2, 56), bool)
    assert flop_bound(cfg, masks, 2)["bound"] == 1.0
    masks[1, 1::2] = False  # drop every MLP at the second step
    b = flop_bound(cfg, masks, 2)
    want = 2 * u.sum() / (2 * u.sum() - u[1::2].sum())
    assert abs(b["bound"] - want) < 1e-12 and 1.0 < b["bound_with_fixed"] < b["bound"]


def test_bad_strategy_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--config", "configs/bench.py:smoke",
                        "--config.strategy=eager", f"--config.output={tmp_path / 'x.jsonl'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "strategy" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_tiny_forward_mode_reports_flop_rate(tmp_path):
    # With a peak given (a CPU has no datasheet peak: test_peak_table_and_schedule_flops), MFU is the rate over it.
    row, stdout = _run(tmp_path, "--config.mode=forward", "--config.repeats=2", "--config.warmup=1",
                       "--config.dtype=float32", "--config.batch_size=3", "--config.peak_tflops=2.0")
    assert row["mode"] == "forward" and row["batch_size"] == 3 and row["dtype"] == "float32"
    fwd = row["forward"]
    assert fwd["n"] == 2 and fwd["median"] > 0 and fwd["tflops"] > 0 and fwd["flops"] > 0
    assert fwd["tflops"] == pytest.approx(fwd["flops"] / fwd["median"] / 1e12)  # the rate is FLOPs over time
    assert fwd["mfu"] == pytest.approx(fwd["tflops"] / 2.0) and fwd["peak_source"] == "config.peak_tflops"
    assert row["matmul"]["tflops"] > 0 and row["matmul"]["forward_over_matmul"] > 0
    assert "TFLOP/s" in stdout


def test_peak_table_and_schedule_flops():
    from l2c_jax.bench.flops import forward_flops, peak_tflops, schedule_flops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
    assert peak_tflops("NVIDIA H200", "bfloat16")[0] == 989.4
    assert peak_tflops("cpu", "float32")[0] is None
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32")[0] is None
    assert peak_tflops("cpu", "float32", 1.5) == (1.5, "config.peak_tflops")
    cfg = DiTConfig.from_name("DiT-XL/2", input_size=32)
    # DiT-XL/2 256 px: 118.6 GMACs per image in the DiT paper, i.e. ~237 GFLOP at 2 FLOPs a multiply-add.
    assert abs(forward_flops(cfg, 1) / 2 / 118.6e9 - 1) < 0.01
    assert schedule_flops(cfg, None, 3, 2) == 3 * forward_flops(cfg, 2)
    masks = np.zeros((3, 56), bool)
    assert schedule_flops(cfg, masks, 3, 2) < schedule_flops(cfg, masks | True, 3, 2) == 3 * forward_flops(cfg, 2)


@pytest.mark.parametrize("variant,schedules", [("digits_schedules", ("fora:4", "taylorseer:4/2")),
                                               ("digits_uvit_schedules", ("fora:2", "l2c:l2c"))])
def test_the_schedules_benchmark_times_both_families_beside_their_bounds(tmp_path, variant, schedules):
    from l2c_jax.bench.schedules import run_schedules_benchmark
    from l2c_jax.cli import parse_config_flags

    out = tmp_path / "rows.jsonl"
    config, _ = parse_config_flags(["--config", f"configs/bench.py:{variant}", "--config.batch_size=4",
                                    "--config.repeats=1", "--config.strategy=cond", f"--config.output={out}",
                                    f"--config.compilation_cache_dir={tmp_path / 'xla'}"])
    config.schedules = schedules
    config.history_dtypes = ()
    run_schedules_benchmark(config, report=lambda *_: None)
    row = json.loads(out.read_text().splitlines()[0])
    by = {r["schedule"]: r for r in row["rows"]}
    assert set(by) == {"full", *schedules} and row["steps"] == 50
    assert by["full"]["flop_bound"] == 1.0 and all(r["latency"] > 0 for r in row["rows"])
    first = by[schedules[0]]
    assert first["computed_share"] == pytest.approx(0.26 if variant == "digits_schedules" else 0.5)
    assert first["flop_bound"] > 1.5
    assert first["speedup_over_bound"] == pytest.approx(first["speedup"] / first["flop_bound"])
