"""Benchmark target: DiT-XL/2, 256 px, DDIM 20, CFG 4.0, the released DDIM20 router at threshold 0.1.

Random weights (the latency does not depend on their values); point
`model.checkpoint` at a converted DiT-XL-2-256x256 (and `model.random_init=False`)
to time the real one. The router is the released `DDIM20_router.pt`: the
default path is where the README's download puts it; the project's test
fixtures hold a copy (`../shared/fixtures/routers/DDIM20_router.pt`).

  python scripts/benchmark.py --config configs/bench_dit_xl2_256_ddim20.py \
      [--config.batch_size=8] [--config.dtype=bfloat16] [--config.strategy=scan] \
      [--config.torch_reference=/tmp/l2c_orig/DiT]
"""

import os

import ml_collections

_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures",
                        "routers", "DDIM20_router.pt")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "dit_xl2_256_ddim20"
    c.model = ml_collections.ConfigDict(dict(name="DiT-XL/2", input_size=32, checkpoint="", random_init=True,
                                             init_seed=0))
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=20, cfg_scale=4.0, eta=0.0, guidance_channels=3))
    router = "ckpt/DDIM20_router.pt"
    if not os.path.exists(router) and os.path.exists(_FIXTURE):
        router = os.path.normpath(_FIXTURE)
    c.router = ml_collections.ConfigDict(dict(checkpoint=router, kind="dit-ddim", threshold=0.1, seed=0))
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)  # the original sample.py's
    c.mode = "sample"         # "sample": full vs L2C schedules; "forward": one full forward's FLOP rate / MFU
    c.batch_size = 1          # images per batch (the model sees 2x with CFG)
    c.dtype = "float32"       # or "bfloat16"
    c.strategy = "auto"       # "static" (a graph per distinct mask), "scan" / "cond" (one graph), "auto" (per backend)
    c.scan_unroll = 1
    c.seed = 0
    c.warmup = 1              # untimed L2C runs after compilation (they call every compiled graph)
    c.repeats = 2             # timed runs of each schedule (interleaved); a 20-step XL/2 run is ~1-2 min on 2 CPU cores
    c.max_steps = 0           # > 0: time only the first N steps (e.g. batch 8 on a CPU); the bound follows
    c.measure_compile = True  # cold / warm compile of the L2C schedule in fresh processes
    c.measure_latency = True  # False: compile times only
    c.compile_workers = 0     # threads compiling graphs in parallel (0 = CPU count)
    c.compilation_cache_dir = "default"  # "default" (~/.cache/l2c_jax/xla or $L2C_JAX_CACHE_DIR), "off", or a path
    c.compare_float32 = True  # with bfloat16: also run float32 once and report the deviation
    c.torch_reference = ""    # path to the original repo's DiT folder: also time the PyTorch original
    c.torch_threads = 2
    c.peak_tflops = 0.0       # > 0: the chip's peak for MFU (else the datasheet table in l2c_jax/bench/flops.py)
    c.inner = 1               # mode=forward: forwards per timed repeat (raise where one forward is milliseconds)
    c.matmul_probe = True     # mode=forward: also time a matmul chain of the MLP shape in the same dtype
    c.matmul_probe_rows = 8192
    c.torch_warmup = 1        # untimed forwards of the PyTorch model before its timed runs
    c.torch_repeats = 1
    c.output = "out/bench/dit_xl2_256_ddim20.jsonl"
    return c
