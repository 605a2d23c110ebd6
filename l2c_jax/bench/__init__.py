"""`scripts/benchmark.py`: one measurement per run, chosen by `config.mode`.

- "sample" (default): full vs L2C sampling latency, compile time, memory, FLOP bound (`bench.sampling`);
- "forward": one full-model forward's FLOP rate and MFU (`bench.forward`);
- "user_path": the user's path at full size, convert -> load -> compile -> sample -> decode (`bench.user_path`);
- "schedules": several cache schedules' measured speed-up against full, side by side, beside their FLOP bounds
  (`bench.schedules`).

Layers, importing downwards only: flops (no jax) < harness < compile_probe, reference < the three modes.
"""

from __future__ import annotations

from typing import Callable

from l2c_jax.bench.forward import run_forward_benchmark
from l2c_jax.bench.sampling import run_sample_benchmark
from l2c_jax.bench.schedules import run_schedules_benchmark
from l2c_jax.bench.user_path import run_user_path
from l2c_jax.errors import ConfigError


def run_benchmark(config, report: Callable = print, argv=None) -> dict:
    """Runs the mode `config.mode` names; returns its JSON row."""
    mode = config.get("mode", "sample")
    if mode == "sample":
        return run_sample_benchmark(config, report, argv)
    if mode == "forward":
        return run_forward_benchmark(config, report, argv)
    if mode == "user_path":
        return run_user_path(config, report)
    if mode == "schedules":
        return run_schedules_benchmark(config, report, argv)
    raise ConfigError(f"mode must be 'sample' (full vs L2C schedules), 'forward' (MFU), 'user_path' "
                      f"(convert -> sample at full size) or 'schedules' (several schedules against full), got {mode!r}")
