"""`scripts/benchmark.py` (mode "sample"): latency, compile time, memory and FLOP bound of DiT sampling with L2C.

One run of `run_benchmark(config)` measures, for one batch size, precision and
execution strategy (`l2c_jax.sampling.base`):

- latency per batch of the full schedule and of the L2C schedule: warm-up
  runs excluded, then `repeats` timed runs of each, interleaved (full, L2C,
  L2C, full, ...) so a drifting machine load biases neither; median, min, max;
- the FLOP bound of the schedule: total attention + MLP FLOPs of the full
  schedule over those the masks keep, each unit weighted by its own FLOPs
  (`flop_bound`; the always-computed embedders, adaLN and final layer are
  reported apart, in `bound_with_fixed`), and measured speed-up / bound;
- compile time of the whole L2C schedule: cold (a fresh process, an empty
  persistent compilation cache) and warm (a second fresh process reading the
  cache the first one wrote), each in its own subprocess, plus the
  ahead-of-time compile of the measuring process itself;
- peak memory: resident set size of the process, sampled while sampling (CPU),
  or the device's peak bytes in use when the backend reports it;
- with dtype bfloat16, the deviation of the L2C latents from float32 ones;
- optionally the original PyTorch L2C code on the same weights
  (`torch_reference`), timed the same way;
- the achieved FLOP rate of both schedules (and MFU where the chip's peak is
  known, `l2c_jax.bench.flops`).

It prints the measured speed-up, the bound and their ratio, and appends one
JSON row to `config.output`.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, Dict

import numpy as np

from l2c_jax.bench.compile_probe import measure_compile
from l2c_jax.bench.flops import device_kind, flop_bound, peak_tflops, throughput_of_schedule
from l2c_jax.bench.harness import (bench_schedule, build_model, build_sampler, compilation_cache_of, dtype_of,
                                   inputs, machine_info, rel, rel_rms, resolve_strategy, summarize, typed_model,
                                   write_row)
from l2c_jax.bench.reference import torch_reference
from l2c_jax.checkpoint import tree_bytes
from l2c_jax.errors import ConfigError
from l2c_jax.memory import Phases, device_peak_bytes, maxrss_bytes

# Keys every JSON row has (tests check them; values may be None when not measured).
ROW_KEYS = (
    "name", "date", "command", "machine", "model", "image_size", "steps", "schedule_steps", "batch_size",
    "cfg_scale", "dtype", "strategy", "router", "threshold", "warmup", "repeats", "computed_share",
    "flop_bound", "bound_with_fixed", "full", "l2c", "speedup", "speedup_over_bound", "compile",
    "memory", "l2c_vs_full_rel", "bf16_vs_f32", "torch_reference", "throughput", "matmul_precision",
    "schedule", "forecast", "history_bytes", "history_bytes_all_units",
)


def run_sample_benchmark(config, report: Callable = print, argv=None) -> dict:
    """Measures one (batch size, dtype, strategy) point; returns the JSON row (also appended to config.output)."""
    import jax
    import jax.numpy as jnp

    cache_dir = compilation_cache_of(config)
    if config.get("matmul_precision"):  # GPUs run float32 matmuls in TF32 by default
        jax.config.update("jax_default_matmul_precision", str(config.matmul_precision))
    strategy = resolve_strategy(config.get("strategy", "auto"))
    dtype = dtype_of(config)
    batch = int(config.batch_size)
    workers = int(config.get("compile_workers", 0) or 0) or (os.cpu_count() or 1)
    row = _row_header(config, argv, strategy, dtype)
    report(f"machine: {row['machine']['cpu']}, {row['machine']['cores']} cores, backend {row['machine']['backend']}")

    latency = bool(config.get("measure_latency", True))
    t0 = time.perf_counter()
    model32 = build_model(config, abstract=not latency)  # compile-only runs need shapes only
    jax.block_until_ready(model32.params)
    report(f"model ready in {time.perf_counter() - t0:.1f} s")
    router, schedule, run_masks = _schedule_row(config, row, model32, strategy, report)

    # -- compile: cold / warm in fresh processes, then this process's own ahead-of-time compile
    comp: Dict[str, Any] = dict(cache_dir=cache_dir)
    if config.get("measure_compile", True):
        report("compile: cold and warm start of the L2C schedule in fresh processes ...")
        comp.update(measure_compile(config, strategy, batch, workers))
        report(f"  cold {comp['cold_s']:.2f} s, warm {comp['warm_s']:.2f} s, {comp['graphs']} graph(s), "
               f"{comp['workers']} worker(s)")
    if not latency:  # compile-only run
        row["compile"] = comp
        row["memory"] = dict(maxrss_bytes=maxrss_bytes(), device_peak_bytes=device_peak_bytes())
        return write_row(config, row, report)
    model = typed_model(model32, dtype)
    sampler = build_sampler(model, config, strategy)
    noise, y = inputs(config, model, batch)
    t0 = time.perf_counter()
    st = sampler.compile(batch, schedule, workers=workers)
    st_full = sampler.compile(batch, None, workers=workers)
    comp.update(in_process_s=time.perf_counter() - t0, in_process_graphs=st["graphs"] + st_full["graphs"])
    report(f"  this process: {comp['in_process_graphs']} graph(s) in {comp['in_process_s']:.2f} s "
           f"(persistent cache {'at ' + cache_dir if cache_dir else 'off'})")
    row["compile"] = comp

    lat = _time_full_and_schedule(config, row, sampler, schedule, noise, y, report)
    rows = batch * (2 if sampler.cfg_scale is not None else 1)
    peak, _ = peak_tflops(device_kind(row["machine"]), str(dtype), float(config.get("peak_tflops", 0.0) or 0.0))
    row["throughput"] = throughput_of_schedule(model32.config, run_masks, row["schedule_steps"], rows,
                                               row["full"]["median"], row["l2c"]["median"], peak)
    report(f"achieved: full {row['throughput']['full_tflops'] * 1e3:.1f} GFLOP/s, "
           f"L2C {row['throughput']['l2c_tflops'] * 1e3:.1f} GFLOP/s"
           + (f" (MFU {row['throughput']['full_mfu'] * 100:.1f}% / {row['throughput']['l2c_mfu'] * 100:.1f}%)"
              if peak else ""))

    # -- bfloat16 deviation from float32
    if dtype == jnp.bfloat16 and config.get("compare_float32", True):
        s32 = build_sampler(model32, config, strategy)
        ref = s32(noise, y, schedule, max_steps=int(config.get("max_steps", 0) or 0))
        row["bf16_vs_f32"] = dict(l2c_rel_max=rel(lat["l2c"], ref), l2c_rel_rms=rel_rms(lat["l2c"], ref))
        report(f"bfloat16 vs float32 L2C latents: max {row['bf16_vs_f32']['l2c_rel_max']:.3e}, "
               f"rms {row['bf16_vs_f32']['l2c_rel_rms']:.3e} (relative)")
        del s32
    sampler = None  # free the JAX graphs and weights before the PyTorch side runs
    if config.get("torch_reference"):
        _against_the_original(config, row, model32, router, schedule, noise, y, lat, dtype, report)
    return write_row(config, row, report)


def _row_header(config, argv, strategy, dtype) -> Dict[str, Any]:
    """The row's settings: what was run, where, and how it is timed."""
    steps = int(config.sampler.steps)
    max_steps = int(config.get("max_steps", 0) or 0)
    warmup, repeats = int(config.get("warmup", 1)), int(config.get("repeats", 2))
    if repeats < 1:
        raise ConfigError("repeats must be at least 1")
    row: Dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(name=config.get("name", "benchmark"), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               command=" ".join(["python", "scripts/benchmark.py"] + list(argv or [])), machine=machine_info(),
               batch_size=int(config.batch_size), dtype=str(dtype), strategy=strategy, steps=steps,
               schedule_steps=min(max_steps, steps) if max_steps else steps,
               cfg_scale=config.sampler.get("cfg_scale"), warmup=warmup, repeats=repeats,
               matmul_precision=config.get("matmul_precision") or "default")
    return row


def _schedule_row(config, row, model32, strategy, report):
    """(router or None, schedule, the timed steps' masks), the model, schedule and FLOP bound entered in `row`."""
    import jax

    cfg = model32.config
    sched_steps = row["schedule_steps"]
    row.update(model=dict(depth=cfg.depth, hidden_size=cfg.hidden_size, patch_size=cfg.patch_size,
                          num_heads=cfg.num_heads, input_size=cfg.input_size,
                          params=int(sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(model32.params)))),
               image_size=cfg.input_size * (8 if cfg.in_channels == 4 else 1))
    router, schedule = bench_schedule(config, model32, build_sampler(model32, config, strategy))
    masks = schedule.masks
    if masks is None:
        raise ConfigError(f"schedule {schedule.describe()!r} reuses nothing: the benchmark times a cache schedule")
    row.update(router=router.source if router is not None else None,
               threshold=float(config.router.threshold) if router is not None else None,
               schedule=schedule.describe(), forecast=schedule.forecast)
    run_masks = masks[:sched_steps]
    fb = flop_bound(cfg, run_masks, sched_steps)
    row.update(computed_share=float(np.asarray(run_masks, bool).mean()), flop_bound=fb["bound"],
               bound_with_fixed=fb["bound_with_fixed"])
    report(f"schedule: {sched_steps}/{row['steps']} steps, {row['computed_share'] * 100:.2f}% of sub-layers computed, "
           f"FLOP bound {fb['bound']:.4f}x (with always-computed parts {fb['bound_with_fixed']:.4f}x)")
    return router, schedule, run_masks


def _time_full_and_schedule(config, row, sampler, schedule, noise, y, report) -> dict:
    """Full sampling and the schedule, interleaved after a warm-up; medians, speed-up and memory into `row`.
    Returns the last latents of each ({"full", "l2c"})."""
    max_steps = int(config.get("max_steps", 0) or 0)
    warmup, repeats, batch = row["warmup"], row["repeats"], row["batch_size"]
    kinds = {"full": None, "l2c": schedule}
    hist = sampler.history_bytes(schedule, batch)
    row.update(history_bytes=hist["kept"], history_bytes_all_units=hist["all_units"])
    times = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    lat = {}

    def once(kind):
        t0, c0 = time.perf_counter(), time.process_time()
        out = sampler(noise, y, kinds[kind], max_steps=max_steps)
        out.block_until_ready()
        return out, time.perf_counter() - t0, time.process_time() - c0

    rss0 = maxrss_bytes()
    phases = Phases()
    with phases("sampling") as sampling_memory:
        # Warm-up: untimed L2C runs; they call every compiled graph but the full schedule's,
        # which was compiled ahead of time like the others.
        for w in range(warmup):
            _, dt, _ = once("l2c")
            report(f"  warm-up l2c: {dt:.2f} s")
        for r in range(repeats):
            for kind in (("full", "l2c") if r % 2 == 0 else ("l2c", "full")):
                lat[kind], dt, dc = once(kind)
                times[kind].append(dt), cpu[kind].append(dc)
                report(f"  run {r + 1}/{repeats} {kind}: {dt:.2f} s")
    phases.close()
    row["full"], row["l2c"] = summarize(times["full"], cpu["full"]), summarize(times["l2c"], cpu["l2c"])
    row["speedup"] = row["full"]["median"] / row["l2c"]["median"]
    row["speedup_over_bound"] = row["speedup"] / row["flop_bound"]
    row["l2c_vs_full_rel"] = rel(lat["l2c"], lat["full"])
    params_bytes = tree_bytes(sampler.model.params)
    row["memory"] = dict(peak_rss_sampling_bytes=int(sampling_memory["peak_rss_bytes"]), maxrss_before_sampling_bytes=rss0,
                         maxrss_bytes=maxrss_bytes(), sampler_params_bytes=params_bytes,
                         device_peak_bytes=device_peak_bytes())
    report(f"full {row['full']['median']:.3f} s, L2C {row['l2c']['median']:.3f} s per batch of {batch} "
           f"(median of {repeats}; min {row['full']['min']:.3f} / {row['l2c']['min']:.3f})")
    report(f"speed-up {row['speedup']:.4f}x, FLOP bound {row['flop_bound']:.4f}x, "
           f"ratio {row['speedup_over_bound']:.4f}")
    return lat


def _against_the_original(config, row, model32, router, schedule, noise, y, lat, dtype, report) -> None:
    """Times the original PyTorch code on the same inputs and enters it in `row` (written, then raised, on failure)."""
    import jax.numpy as jnp

    steps, repeats = row["steps"], row["repeats"]
    max_steps = int(config.get("max_steps", 0) or 0)
    if max_steps and max_steps < steps:
        raise ConfigError("torch_reference times whole schedules: leave max_steps at 0")
    if router is None or schedule.forecasts:
        raise ConfigError("torch_reference runs the original's L2C (a router, copies): unset schedule")
    report(f"original PyTorch code ({config.torch_reference}), {config.get('torch_threads', 2)} threads ...")
    tw = int(config.get("torch_warmup", 1))
    tr = int(config.get("torch_repeats", repeats))
    try:
        ref, tfull, tl2c = torch_reference(config, model32, router, noise, y, steps, tw, tr, report)
    except Exception as e:  # keep the JAX measurements: write the row, then fail
        row["torch_reference"] = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        write_row(config, row, report)
        raise
    ref["jax_full_over_torch"] = row["full"]["median"] / ref["full"]["median"]
    ref["full_latents_rel"] = rel(lat["full"], tfull) if dtype == jnp.float32 else None
    if "l2c" in ref:
        ref["jax_l2c_over_torch"] = row["l2c"]["median"] / ref["l2c"]["median"]
        ref["l2c_latents_rel"] = rel(lat["l2c"], tl2c) if dtype == jnp.float32 else None
        report(f"torch: full {ref['full']['median']:.2f} s, L2C {ref['l2c']['median']:.2f} s "
               f"(speed-up {ref['speedup']:.4f}x); JAX/torch time: full {ref['jax_full_over_torch']:.3f}, "
               f"L2C {ref['jax_l2c_over_torch']:.3f}; latents vs torch: full {ref['full_latents_rel']}, "
               f"L2C {ref.get('l2c_latents_rel')} (relative max)")
    row["torch_reference"] = ref
