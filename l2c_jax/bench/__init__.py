"""Benchmarks of what users run (the sampling benchmark proper still lives in `l2c_jax.benchmark`)."""
