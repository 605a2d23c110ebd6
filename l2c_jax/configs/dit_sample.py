"""DiT sampling with DDIM, with or without the learned cache (scripts/sample.py).

The variant after `:` names the run:

  python scripts/sample.py --config configs/dit_sample.py:xl2_256_ddim20_l2c   # DiT-XL/2, 256 px, DDIM 20, L2C
  python scripts/sample.py --config configs/dit_sample.py:xl2_256_ddim20       # the same without the cache
  python scripts/sample.py --config configs/dit_sample.py:smoke                # tiny random DiT, CPU, seconds

- `MODEL_SIZE_ddimN[_l2c]`: MODEL is xl2 (DiT-XL/2; l2, b2, s2, xl4, ... for
  the other sizes), SIZE 256 or 512 px, N DDIM steps, `_l2c` with the
  learned cache. The checkpoint paths are where the README's conversion
  commands write; the released routers (DiT-XL/2 256 at DDIM 20 and 50) are
  read as they are, other settings read a router trained with
  scripts/train_router.py (configs/router_dit.py).
- `digits_ddimN[_l2c]`: the shipped digits DiT (assets/digits, 8x8 pixels,
  no VAE) and its router for N = 20 or 50: 1,000 images with labels drawn
  per image, written to samples.npz. Nothing to download; the multi-process
  tests and README examples run it.
- `..._taylorseerN`: instead of `_l2c`, TaylorSeer's forecast every N-th
  step, second order (`--config.schedule=taylorseer:N/2`; any caching method
  works through `--config.schedule`, e.g. `fora:3`, `l2c:0.3`).
- `smoke`: a randomly initialised pixel-space DiT (16x16 RGB, 4 blocks), no
  checkpoint, no VAE: the whole sampling path in seconds on a CPU. Set
  `--config.model.checkpoint=DIR --config.model.random_init=False` to sample
  a converted model instead.

Without a variant: xl2_256_ddim20.
"""

import re

import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.digits_dit import ARCH as DIGITS_ARCH
from l2c_jax.models.dit import DIT_VARIANTS
from l2c_jax.resources import asset

# The released routers exist for DiT-XL/2 256 at DDIM 20 and 50 (threshold 0.1);
# other step counts / sizes need a router trained with scripts/train_router.py.
RELEASED_ROUTERS = {(256, 20): "ckpt/DDIM20_router.pt", (256, 50): "ckpt/DDIM50_router.pt"}
THRESHOLDS = {(256, 50): 0.1, (256, 20): 0.1, (256, 10): 0.1, (512, 50): 0.9}

FORMS = ("MODEL_SIZE_ddimN[_l2c|_taylorseerK] with MODEL xl2|l2|b2|s2|xl4|..., SIZE 256|512 "
         "(e.g. xl2_256_ddim20_l2c, xl2_256_ddim20_taylorseer3)",
         "digits_ddim20[_l2c]", "digits_ddim50[_l2c]", "smoke")
VARIANTS = (tuple(f"xl2_{s}_ddim{n}{l}" for s in (256, 512) for n in (10, 20, 50) for l in ("", "_l2c"))
            + tuple(f"digits_ddim{n}{l}" for n in (20, 50) for l in ("", "_l2c")) + ("smoke",))
_PATTERN = (r"(?P<size>xl|l|b|s)(?P<patch>[248])_(?P<image>256|512)_ddim(?P<steps>[1-9][0-9]*)"
            r"(?:(?P<l2c>_l2c)|_taylorseer(?P<taylor>[1-9][0-9]*))?")


def base(image_size=256, steps=20, l2c=False, model="DiT-XL/2"):
    c = ml_collections.ConfigDict()
    tag = model.replace("DiT-", "").replace("/", "").lower()
    c.model = common.model("dit", checkpoint=f"ckpt/dit_{tag}_{image_size}", name=model,
                           arch_fields=dict(input_size=image_size // 8))
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/sd-vae-ft-ema", scale=0.18215, decode_chunk=16))
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps, cfg_scale=4.0, eta=0.0,
                                               guidance_channels=3))
    router = ""
    if l2c:  # the released router where there is one, else where train_router.py's README command writes
        released = RELEASED_ROUTERS.get((image_size, steps)) if model == "DiT-XL/2" else None
        router = released or f"ckpt/router_dit_{tag}_{image_size}_ddim{steps}"
    c.router = ml_collections.ConfigDict(dict(checkpoint=router, kind="dit-ddim",
                                              threshold=THRESHOLDS.get((image_size, steps), 0.1),
                                              retarget=False))  # True: a router of another step count, interpolated
    # Any caching method's schedule instead of the router's (l2c_jax.methods): "taylorseer:3/2", "fora:3",
    # "l2c:0.3" (the router above at another threshold), ...; "" = the router's, or none.
    c.schedule = ""
    # What calibrated schedules sample first, from their own noise (seed): full trajectories for SmoothCache and
    # the error ranking, images a search compares with the full sampler's ("taylorseer:search13/2").
    c.calibration = ml_collections.ConfigDict(dict(num_samples=64, seed=1000, search_samples=256))
    c.history_dtype = ""  # a forecast's derivative terms: "" = float32, or "bfloat16" (half the memory)
    # The original sample.py's labels; set num_samples (and labels=()) for random labels, e.g. 50k for FID.
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)
    c.num_samples = 0
    c.batch_size = 8
    c.seed = 0
    c.repeats = 5  # timed re-runs of the first batch after a warm-up run, as the original reports
    c.dtype = "float32"
    c.strategy = "auto"  # static | cond; auto = cond on CPU and GPU, static elsewhere (docs/performance.md)
    c.compilation_cache_dir = "default"  # persistent XLA cache: ~/.cache/l2c_jax/xla, a path, or "off"
    c.workdir = f"out/dit_{tag}_{image_size}_ddim{steps}{'_l2c' if l2c else ''}"
    c.grid = "samples.png"
    c.grid_max = 64
    c.grid_upscale = 1
    c.npz = ""  # e.g. "samples.npz" for the ADM evaluator
    c.overwrite = False  # replace the outputs of a different earlier job in the workdir
    # Score the samples at the end as the ADM evaluator does (IS, FID, sFID, precision, recall), e.g.
    # --config.num_samples=50000 --config.labels='()' --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz
    c.evaluate = ml_collections.ConfigDict(dict(reference="", inception="ckpt/inception_fid", batch_size=64))
    return c


def smoke():
    c = base(steps=10)
    c.model = common.model("dit", random_init=True, init_seed=0, arch_fields=dict(
        input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=4,
        num_classes=10, learn_sigma=True, class_dropout_prob=0.1, mlp_ratio=4.0))
    c.vae.checkpoint = ""  # pixel space: samples are images
    c.labels = tuple(range(10))
    c.batch_size = 10
    c.repeats = 2
    c.grid_upscale = 4
    c.workdir = "out/dit_smoke"
    return c


def digits(steps: int, l2c: bool):
    c = base(steps=steps)
    c.model = common.model("dit", checkpoint=asset("digits", "dit"), arch_fields=DIGITS_ARCH)
    c.vae.checkpoint = ""  # pixel space: samples are images
    c.sampler.cfg_scale = 1.0  # no guidance: the best FID on this model (configs/digits.py)
    c.router.checkpoint = asset("digits", f"router_ddim{steps}.safetensors") if l2c else ""
    c.router.threshold = 0.5
    c.labels = ()
    c.num_samples = 1000
    c.batch_size = 250
    c.repeats = 0
    c.npz = "samples.npz"
    c.grid_upscale = 8
    c.evaluate.inception = ""
    c.workdir = f"out/digits_ddim{steps}{'_l2c' if l2c else ''}"
    return c


def get_config(arg=None):
    arg = common.variant(arg, "xl2_256_ddim20")
    if arg == "smoke":
        return smoke()
    d = re.fullmatch(r"digits_ddim(20|50)(_l2c)?", arg)
    if d:
        return digits(int(d[1]), bool(d[2]))
    m = re.fullmatch(_PATTERN, arg)
    model = m and f"DiT-{m['size'].upper()}/{m['patch']}"
    if model not in DIT_VARIANTS:
        raise common.unknown("dit_sample.py", arg, FORMS)
    c = base(int(m["image"]), int(m["steps"]), bool(m["l2c"]), model)
    if m["taylor"]:
        c.schedule = f"taylorseer:{m['taylor']}/2"
        c.workdir = c.workdir + f"_taylorseer{m['taylor']}"
    return c
