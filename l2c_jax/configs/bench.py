"""Benchmarks (scripts/benchmark.py); the variant after `:` picks the measurement (`config.mode`).

  python scripts/benchmark.py --config configs/bench.py:dit_xl2_256_ddim20 \\
      [--config.batch_size=8] [--config.dtype=bfloat16] [--config.strategy=static] \\
      [--config.torch_reference=/tmp/l2c_orig/DiT]
  python scripts/benchmark.py --config configs/bench.py:dit_xl2_256_forward      # MFU at batch 256, bfloat16
  python scripts/benchmark.py --config configs/bench.py:user_path_dit            # convert -> sample at full size
  python scripts/benchmark.py --config configs/bench.py:smoke                    # seconds on a CPU

- `dit_xl2_256_ddimN` (N = 20 or 50; the default is 20), mode "sample":
  DiT-XL/2, 256 px, DDIM N, CFG 4.0, full vs L2C schedules with the released
  DDIM-N router at threshold 0.1: latency, compile time, memory, FLOP bound.
  Random weights (the latency does not depend on their values); set
  `--config.model.checkpoint=DIR --config.model.random_init=False` to time a
  converted DiT-XL-2-256x256. The router default is where the README's
  download puts it (ckpt/DDIM20_router.pt); from a checkout whose
  ../shared/fixtures holds the released routers, those copies.
- `dit_MODEL_SIZE_forward` (e.g. dit_xl2_256_forward), mode "forward": one
  full forward (every sub-layer computed) at batch 256 in bfloat16; its FLOP
  rate, MFU against the chip's datasheet dense bf16 peak
  (`l2c_jax.bench.flops.PEAK_TFLOPS`; `--config.peak_tflops=` for chips not
  listed) and against a matmul chain of the MLP shape on the same device. On
  a CPU: `--config.batch_size=2 --config.dtype=float32`.
- `user_path_dit`, `user_path_uvit`, mode "user_path": the user's path at
  full size, convert -> load -> compile -> sample -> decode (README figures):
  DiT-XL/2 256 + SD-VAE + DDIM20_router.pt, or U-ViT-H/2 256 + autoencoder +
  dpm20_router.pth. Random weights written in the original PyTorch formats
  (under `workdir/source`, kept for later runs), converted with the
  converters, sampled with scripts/sample.py, each step a fresh process.
  `user_path_dit_taylorseer`: the same DiT path sampling TaylorSeer 3/2 (no
  router) at batch 8 with guidance, its history in bfloat16.
- `digits_schedules`, mode "schedules": the shipped digits DiT, DDIM 50,
  batch 1,000: TaylorSeer 4/2 and 6/2, the period-4 router with forecasts,
  FORA 4 and 6 (copies) and L2C timed against full sampling side by side,
  each beside its FLOP bound, forecasts also with bfloat16 history
  (`--config.schedules=...` for others, any caching method).
- `digits_uvit_schedules`, mode "schedules": the same on the shipped digits
  U-ViT, DPM-Solver-2 at NFE 50, batch 1,000: FORA 2 and 4 and DeepCache 3
  (every N-th model evaluation computes), its L2C router and NFE 24.
- `smoke`: a tiny random DiT, 10 DDIM steps, a seeded random router: the
  benchmark's plumbing in seconds (tests/test_benchmark.py); its numbers mean little.
"""

import os
import re

import ml_collections

from l2c_jax.configs import common
from l2c_jax.models.dit import DIT_VARIANTS

# The released routers: the README's download location, else the project's fixtures beside the checkout
# (this file is l2c_jax/configs/bench.py in the checkout, whichever path loaded it).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
_FIXTURES = os.path.join(os.path.dirname(_CHECKOUT), "shared", "fixtures", "routers")
_ROUTERS = {"ddim20": "DDIM20_router.pt", "ddim50": "DDIM50_router.pt", "dpm20": "dpm20_router.pth"}

FORMS = ("dit_xl2_256_ddim20", "dit_xl2_256_ddim50", "dit_MODEL_SIZE_forward (e.g. dit_xl2_256_forward)",
         "user_path_dit", "user_path_dit_taylorseer", "user_path_uvit", "digits_schedules", "digits_uvit_schedules",
         "smoke")
VARIANTS = ("dit_xl2_256_ddim20", "dit_xl2_256_ddim50", "dit_xl2_256_forward", "dit_xl2_512_forward",
            "user_path_dit", "user_path_dit_taylorseer", "user_path_uvit", "digits_schedules", "digits_uvit_schedules",
         "smoke")


def released_router(name: str) -> str:
    """ckpt/<file> where the README puts the released router, or the fixtures' copy when only that exists."""
    router = os.path.join("ckpt", _ROUTERS[name])
    fixture = os.path.join(_FIXTURES, _ROUTERS[name])
    return fixture if not os.path.exists(router) and os.path.exists(fixture) else router


def sample_benchmark(steps=20):
    c = ml_collections.ConfigDict()
    c.name = f"dit_xl2_256_ddim{steps}"
    c.mode = "sample"         # "sample": full vs L2C schedules; "forward": one full forward's FLOP rate / MFU
    c.model = common.model("dit", name="DiT-XL/2", arch_fields=dict(input_size=32), random_init=True, init_seed=0)
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps, cfg_scale=4.0, eta=0.0, guidance_channels=3))
    c.router = ml_collections.ConfigDict(dict(checkpoint=released_router(f"ddim{steps}"), kind="dit-ddim",
                                              threshold=0.1, seed=0))
    c.schedule = ""           # any caching method instead of the router's schedule, e.g. "taylorseer:3/2"
    c.history_dtype = ""      # a forecast's derivative terms: "" = float32, or "bfloat16"
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)  # the original sample.py's
    c.batch_size = 1          # images per batch (the model sees 2x with CFG)
    c.dtype = "float32"       # or "bfloat16"
    c.strategy = "auto"       # "static" (a graph per distinct mask), "cond" (one graph), "auto" (per backend)
    c.seed = 0
    c.warmup = 1              # untimed L2C runs after compilation (they call every compiled graph)
    c.repeats = 2             # timed runs of each schedule (interleaved); a 20-step XL/2 run is ~1-2 min on 2 CPU cores
    c.max_steps = 0           # > 0: time only the first N steps (e.g. batch 8 on a CPU); the bound follows
    c.measure_compile = True  # cold / warm compile of the L2C schedule in fresh processes
    c.measure_latency = True  # False: compile times only
    c.compile_workers = 0     # threads compiling graphs in parallel (0 = CPU count)
    c.compilation_cache_dir = "default"  # "default" (~/.cache/l2c_jax/xla or $L2C_JAX_CACHE_DIR), "off", or a path
    c.compare_float32 = True  # with bfloat16: also run float32 once and report the deviation
    # float32 matmuls as float32 (no TF32 on GPUs), as the original's side with allow_tf32 off; "" = JAX's default
    c.matmul_precision = "highest"
    c.torch_reference = ""    # path to the original repo's DiT folder: also time the PyTorch original
    c.torch_threads = 2
    c.peak_tflops = 0.0       # > 0: the chip's peak for MFU (else the datasheet table in l2c_jax/bench/flops.py)
    c.inner = 1               # mode=forward: forwards per timed repeat (raise where one forward is milliseconds)
    c.matmul_probe = True     # mode=forward: also time a matmul chain of the MLP shape in the same dtype
    c.matmul_probe_rows = 8192
    c.torch_warmup = 1        # untimed forwards of the PyTorch model before its timed runs
    c.torch_repeats = 1
    c.output = f"out/bench/dit_xl2_256_ddim{steps}.jsonl"
    return c


def forward_benchmark(model="DiT-XL/2", image_size=256):
    c = sample_benchmark()
    tag = model.replace("DiT-", "").replace("/", "").lower()
    c.name = f"dit_{tag}_{image_size}"
    c.mode = "forward"        # "sample": full vs L2C schedules (the default of the other variants)
    c.model.name = model
    c.model.arch.input_size = image_size // 8
    c.batch_size = 256        # rows of one forward (no CFG doubling here)
    c.dtype = "bfloat16"
    c.warmup = 2
    c.repeats = 10
    c.inner = 1               # forwards per timed repeat; `peak_tflops`, `matmul_probe`: as in mode "sample"
    c.output = f"out/bench/dit_{tag}_{image_size}_forward.jsonl"
    return c


def user_path_benchmark(family, schedule=""):
    c = ml_collections.ConfigDict()
    c.mode = "user_path"
    c.family = family         # the model, VAE and sampling config: l2c_jax/bench/user_path.py's FAMILIES
    # The released router file; none where a caching method's schedule is sampled instead.
    c.router = "" if schedule else released_router({"dit": "ddim20", "uvit": "dpm20"}[family])
    c.schedule = schedule     # e.g. "taylorseer:3/2" (any caching method; "" = the router's)
    c.history_dtype = ""      # a forecast's derivative terms: "" = float32, or "bfloat16"
    c.batch_size = 2
    c.repeats = 1  # timed runs after the first (compiling) one
    c.dtype = "float32"
    c.strategy = {"dit": "auto", "uvit": "static"}[family]  # each sampling config's own default
    c.workdir = f"out/bench_user_path_{family}"
    c.output = ""  # a JSON-lines file to append the row to
    return c


def schedules_benchmark():
    from l2c_jax.configs.digits_dit import ARCH
    from l2c_jax.resources import asset

    c = ml_collections.ConfigDict()
    c.name = "digits_schedules_ddim50"
    c.mode = "schedules"
    c.model = common.model("dit", checkpoint=asset("digits", "dit"), arch_fields=ARCH)
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=50, guidance_channels=3))
    c.routers = ml_collections.ConfigDict(dict(k4_taylor2_l1x5=asset("digits", "router_ddim50_k4_taylor2_l1x5.safetensors"),
                                               l2c=asset("digits", "router_ddim50.safetensors")))
    c.threshold = 0.5
    c.schedules = ("fora:4", "fora:6", "taylorseer:4/2", "taylorseer:6/2", "l2c:k4_taylor2_l1x5", "l2c:l2c")
    c.history_dtypes = ("bfloat16",)  # forecasting schedules again, their history in these dtypes
    c.batch_size = 1000
    c.repeats = 3             # interleaved rounds (full and every schedule each round)
    c.strategy = "static"     # runtime, compile excluded: a reused unit is absent from its step's graph
    c.seed = 0
    c.compilation_cache_dir = "default"
    c.output = "out/bench/digits_schedules.jsonl"
    return c


def uvit_schedules_benchmark():
    """The digits U-ViT (configs/digits_uvit.py), DPM-Solver-2 at NFE 50: copy schedules against full."""
    from l2c_jax.configs.digits_uvit import ARCH
    from l2c_jax.resources import asset

    c = schedules_benchmark()
    c.name = "digits_uvit_schedules_nfe50"
    c.model = common.model("uvit", checkpoint=asset("digits", "uvit"), arch_fields=ARCH)
    c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", steps=50, skip_type="time_uniform"))
    c.routers = ml_collections.ConfigDict(dict(l2c=asset("digits", "router_uvit_dpm50.safetensors")))
    c.threshold = 0.9
    c.schedules = ("fora:2", "fora:4", "deepcache:3", "l2c:l2c", "fewer_steps:24")
    c.history_dtypes = ()
    c.output = "out/bench/digits_uvit_schedules.jsonl"
    return c


def smoke():
    c = sample_benchmark()
    c.name = "dit_smoke"
    c.model = common.model("dit", random_init=True, init_seed=0, arch_fields=dict(
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


def get_config(arg=None):
    arg = common.variant(arg, "dit_xl2_256_ddim20")
    if arg == "smoke":
        return smoke()
    if arg in ("dit_xl2_256_ddim20", "dit_xl2_256_ddim50"):
        return sample_benchmark(int(arg[-2:]))
    if arg in ("user_path_dit", "user_path_uvit"):
        return user_path_benchmark(arg[len("user_path_"):])
    if arg == "digits_schedules":
        return schedules_benchmark()
    if arg == "digits_uvit_schedules":
        return uvit_schedules_benchmark()
    if arg == "user_path_dit_taylorseer":  # DiT-XL/2, DDIM 20, batch 8 with guidance, TaylorSeer 3/2, bf16 history
        c = user_path_benchmark("dit", schedule="taylorseer:3/2")
        c.batch_size = 8
        c.history_dtype = "bfloat16"
        c.workdir = "out/bench_user_path_dit_taylorseer"
        return c
    m = re.fullmatch(r"dit_(xl|l|b|s)([248])_(256|512)_forward", arg)
    model = m and f"DiT-{m[1].upper()}/{m[2]}"
    if model not in DIT_VARIANTS:
        raise common.unknown("bench.py", arg, FORMS)
    return forward_benchmark(model, int(m[3]))
