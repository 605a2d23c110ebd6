"""Achieved FLOP rate and model FLOPs utilisation (MFU) of the DiT forward.

`scripts/benchmark.py --config configs/bench.py:dit_xl2_256_forward` (config
`mode="forward"`) times one full-model forward (every sub-layer computed, no
CFG doubling: `batch_size` rows) and reports

- its FLOP rate, counted like the FLOP bound (`l2c_jax.bench.flops.unit_flops`
  + `fixed_flops`: a multiply-add is 2 FLOPs, softmax / norms not counted);
- MFU: that rate over the chip's dense peak for the dtype, from the vendor
  figures in `l2c_jax.bench.flops.PEAK_TFLOPS` (or `config.peak_tflops`); None where unknown
  (CPUs: no meaningful datasheet peak);
- the rate of a plain matmul chain of the model's largest shape in the same
  dtype on the same device, the practical ceiling a transformer forward can
  approach there (`forward_over_matmul`).

Sampling rows (`l2c_jax.bench.sampling`) carry the same FLOP rate for their full and
L2C schedules (`throughput_of_schedule`).
"""

from __future__ import annotations

import datetime
import statistics
import time
from typing import Any, Callable, Dict

import numpy as np

from l2c_jax.bench.flops import device_kind, forward_flops, peak_tflops
from l2c_jax.bench.harness import (build_model, compilation_cache_of, dtype_of, machine_info, summarize,
                                   typed_model, write_row)
from l2c_jax.errors import ConfigError
from l2c_jax.memory import device_peak_bytes, maxrss_bytes


def matmul_rate(dtype, m: int, k: int, n: int, repeats: int = 5, inner: int = 4) -> float:
    """Best TFLOP/s of `inner` chained (m,k)x(k,n)x(n,k) matmul pairs in `dtype` on the default device."""
    import jax
    import jax.numpy as jnp

    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
    w1 = (jax.random.normal(kb, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    w2 = (jax.random.normal(kc, (n, k), jnp.float32) / np.sqrt(n)).astype(dtype)

    @jax.jit
    def chain(a, w1, w2):
        # The same fc1 -> fc2 shape as the model's MLP; a data dependence keeps every product.
        return jax.lax.fori_loop(0, inner, lambda _, x: (x @ w1) @ w2, a)

    chain(a, w1, w2).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain(a, w1, w2).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return inner * 4.0 * m * k * n / best / 1e12


def run_forward_benchmark(config, report: Callable = print, argv=None) -> dict:
    """Times the full-model forward at `config.batch_size` rows in `config.dtype`; returns the JSON row."""
    import jax
    import jax.numpy as jnp

    compilation_cache_of(config)
    dtype = dtype_of(config, "bfloat16")
    rows = int(config.batch_size)
    warmup, repeats = int(config.get("warmup", 1)), int(config.get("repeats", 2))
    inner = int(config.get("inner", 1) or 1)
    if rows < 1 or repeats < 1:
        raise ConfigError("batch_size and repeats must be at least 1")

    machine = machine_info()
    kind = device_kind(machine)
    row: Dict[str, Any] = dict(
        name=config.get("name", "benchmark") + "_forward", mode="forward",
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python", "scripts/benchmark.py"] + list(argv or [])), machine=machine,
        batch_size=rows, dtype=str(dtype), warmup=warmup, repeats=repeats, inner=inner)
    report(f"machine: {kind}, backend {machine['backend']}; full forward of {rows} rows in {dtype}")

    model = typed_model(build_model(config), dtype)
    cfg = model.config
    flops = forward_flops(cfg, rows)
    key = jax.random.key(int(config.get("seed", 0)))
    x = jax.random.normal(key, (rows, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t = jnp.linspace(0.0, 999.0, rows).astype(jnp.float32)
    y = jnp.asarray(np.arange(rows) % cfg.num_classes, jnp.int32)
    fwd = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(model.params, x, t, y).compile()
    row["compile_s"] = time.perf_counter() - t0

    def once():
        t0 = time.perf_counter()
        for _ in range(inner):
            out = compiled(model.params, x, t, y)
        out.block_until_ready()
        return (time.perf_counter() - t0) / inner

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeats)]
    med = statistics.median(times)
    tflops = flops / med / 1e12
    peak, source = peak_tflops(kind, str(dtype), float(config.get("peak_tflops", 0.0) or 0.0))
    row["forward"] = dict(summarize(times), flops=flops, tflops=tflops, peak_tflops=peak, peak_source=source,
                          mfu=tflops / peak if peak else None)
    report(f"forward: {med * 1e3:.2f} ms median of {repeats} (min {min(times) * 1e3:.2f}), "
           f"{flops / 1e12:.3f} TFLOP -> {tflops:.2f} TFLOP/s"
           + (f", MFU {tflops / peak * 100:.1f}% of {peak:g} ({source})" if peak else f"; MFU: {source}"))

    if config.get("matmul_probe", True):
        n_tok = (cfg.input_size // cfg.patch_size) ** 2
        m = min(rows * n_tok, int(config.get("matmul_probe_rows", 8192)))
        rate = matmul_rate(dtype, m, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio))
        row["matmul"] = dict(shape=[m, cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)], tflops=rate,
                             forward_over_matmul=tflops / rate)
        report(f"matmul chain {m}x{cfg.hidden_size}x{int(cfg.hidden_size * cfg.mlp_ratio)} in {dtype}: "
               f"{rate:.2f} TFLOP/s; the forward runs at {tflops / rate * 100:.1f}% of it")
    row["memory"] = dict(maxrss_bytes=maxrss_bytes(), device_peak_bytes=device_peak_bytes())
    return write_row(config, row, report)
