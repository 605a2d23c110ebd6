"""Benchmark DiT sampling with and without the learned cache (latency, compile time, memory, FLOP bound).

  python scripts/benchmark.py --config configs/bench_dit_xl2_256_ddim20.py [--config.KEY=VALUE ...]

Common overrides: --config.batch_size=8  --config.dtype=bfloat16  --config.strategy=static|scan|auto
  --config.repeats=2  --config.max_steps=2  --config.torch_reference=/tmp/l2c_orig/DiT  --config.output=FILE
See BENCHMARKS.md for the measured numbers and the exact commands.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l2c_jax.cli import run_main  # noqa: E402
from l2c_jax.configs import parse_config_flags  # noqa: E402


def main(argv):
    config, _ = parse_config_flags(argv, __doc__)
    from l2c_jax.bench import run_benchmark

    run_benchmark(config, argv=[a for a in argv if a != "--verbose"])


if __name__ == "__main__":
    run_main(main)
