"""A benchmark that finishes in seconds on a CPU: tiny random DiT, 10 DDIM steps, a seeded random router.

Checks the benchmark's plumbing (tests/test_benchmark.py runs it); its numbers mean little.

  python scripts/benchmark.py --config configs/bench_dit_smoke.py
"""

import ml_collections

from configs.bench_dit_xl2_256_ddim20 import get_config as _xl


def get_config(arg=None):
    c = _xl()
    c.name = "dit_smoke"
    c.model.arch = ml_collections.ConfigDict(dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
        num_classes=10, learn_sigma=True, class_dropout_prob=0.1, mlp_ratio=4.0))
    c.sampler.steps = 10
    c.router.checkpoint = "random"  # a seeded random router (router.seed); or a dit-ddim router file
    c.router.threshold = 0.5
    c.labels = tuple(range(10))
    c.batch_size = 2
    c.warmup = 1
    c.repeats = 2
    c.torch_warmup = 1
    c.torch_repeats = 1
    c.output = "out/bench/dit_smoke.jsonl"
    return c
