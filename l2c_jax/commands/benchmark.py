"""Benchmark DiT sampling with and without the learned cache (latency, compile time, memory, FLOP bound).

  python scripts/benchmark.py --config configs/bench.py:dit_xl2_256_ddim20 [--config.KEY=VALUE ...]
  python scripts/benchmark.py --config configs/bench.py:VARIANT     # dit_xl2_256_forward, user_path_dit, smoke, ...

Common overrides: --config.batch_size=8  --config.dtype=bfloat16  --config.strategy=static|cond|auto
  --config.repeats=2  --config.max_steps=2  --config.torch_reference=/tmp/l2c_orig/DiT  --config.output=FILE
See docs/performance.md for the measured numbers and the exact commands.
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main


def main(argv):
    config, _ = parse_config_flags(argv, __doc__)
    from l2c_jax.bench import run_benchmark

    run_benchmark(config, argv=[a for a in argv if a != "--verbose"])


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
