"""Benchmark DiT sampling with and without the learned cache (latency, compile time, memory, FLOP bound).

The same as the console command `l2c-benchmark`; `l2c-benchmark --help` for the usage.
"""

from l2c_jax.commands.benchmark import run

if __name__ == "__main__":
    run()
