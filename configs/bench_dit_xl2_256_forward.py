"""MFU target: one full DiT-XL/2 forward (256 px, every sub-layer computed) at batch 256 in bfloat16.

Reports the forward's FLOP rate, its MFU against the chip's datasheet dense
bf16 peak (`l2c_jax.bench.flops.PEAK_TFLOPS`; `--config.peak_tflops=` for chips
not listed) and against a plain matmul chain of the model's MLP shape on the
same device. Random weights: the time does not depend on their values.

  python scripts/benchmark.py --config configs/bench_dit_xl2_256_forward.py
  python scripts/benchmark.py --config configs/bench_dit_xl2_256_forward.py --config.batch_size=2 --config.dtype=float32  # a CPU
"""

from configs.bench_dit_xl2_256_ddim20 import get_config as _sampling


def get_config(arg=None):
    c = _sampling()
    c.name = "dit_xl2_256"
    c.mode = "forward"        # "sample": full vs L2C schedules (the default of the other bench configs)
    c.batch_size = 256        # rows of one forward (no CFG doubling here)
    c.dtype = "bfloat16"
    c.warmup = 2
    c.repeats = 10
    c.inner = 1               # forwards per timed repeat; `peak_tflops`, `matmul_probe`: the base config's
    c.output = "out/bench/dit_xl2_256_forward.jsonl"
    return c
