"""U-ViT sampling with DPM-Solver-2, with or without the learned cache (scripts/sample.py).

The variant after `:` names the run:

  python scripts/sample.py --config configs/uvit_sample.py:h2_256_nfe20_l2c   # U-ViT-H/2, 256 px, NFE 20, L2C
  python scripts/sample.py --config configs/uvit_sample.py:h2_256_nfe20       # the same without the cache
  python scripts/sample.py --config configs/uvit_sample.py:smoke              # tiny random U-ViT, CPU, seconds

- `MODEL_SIZE_nfeN[_l2c]`: MODEL is h2 (U-ViT-H/2; h4, l2, l4, m4, s2, s4 for
  the other sizes), SIZE 256 or 512 px, N the model evaluations per
  branch (DPM-Solver-2 singlestep takes N // 2 steps; even, >= 4), `_l2c`
  with the learned cache. The checkpoint paths are where the README's
  conversion commands write; the released routers (U-ViT-H/2 256 at NFE 20
  and 50, threshold 0.9) are read as they are (`.pth`), other settings read
  a router trained with scripts/train_router.py (configs/router_uvit.py).
- `digits_nfeN[_l2c]`: the shipped digits U-ViT (assets/digits/uvit, pixel
  space, no guidance) at NFE N, `_l2c` with its shipped router
  (assets/digits/router_uvit_dpmN.safetensors, N = 20 or 50): 100 samples,
  ten of each digit.
- `smoke`: a randomly initialised pixel-space U-ViT (16x16 RGB, 5 blocks), no
  checkpoint, no VAE: the whole U-ViT sampling path in seconds on a CPU.

Without a variant: h2_256_nfe20.
"""

import re

import ml_collections

from l2c_jax.configs import common
from l2c_jax.models.uvit import UVIT_VARIANTS

# The released routers: U-ViT-H/2 256 with DPM-Solver-2 at NFE 20 and 50, threshold 0.9;
# other NFE need a router trained with scripts/train_router.py (configs/router_uvit.py).
RELEASED_ROUTERS = {(256, 20): "ckpt/dpm20_router.pth", (256, 50): "ckpt/dpm50_router.pth"}
THRESHOLD = 0.9

FORMS = ("MODEL_SIZE_nfeN[_l2c] with MODEL h2|h4|l2|l4|m4|s2|s4, SIZE 256|512, N even (e.g. h2_256_nfe20_l2c)",
         "digits_nfeN[_l2c], N even (the shipped digits U-ViT; routers for 20 and 50)", "smoke")
VARIANTS = ("h2_256_nfe20", "h2_256_nfe20_l2c", "h2_256_nfe50", "h2_256_nfe50_l2c", "digits_nfe20", "digits_nfe20_l2c",
            "digits_nfe50_l2c", "smoke")
_PATTERN = r"(?P<size>[hlms])(?P<patch>[24])_(?P<image>256|512)_nfe(?P<nfe>[1-9][0-9]*)(?P<l2c>_l2c)?"


def base(image_size=256, nfe=20, l2c=False, model="U-ViT-H/2"):
    c = ml_collections.ConfigDict()
    tag = model.replace("U-ViT-", "").replace("/", "").lower()
    c.model = common.model("uvit", checkpoint=f"ckpt/uvit_{tag}_{image_size}", name=model,
                           arch_fields=dict(img_size=image_size // 8))
    # U-ViT's own autoencoder_kl_ema.pth (LDM naming), latents scaled by 0.18215.
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/uvit_autoencoder", scale=0.18215, decode_chunk=16))
    # DPM-Solver-2 singlestep (data prediction), time-uniform steps, SD betas; CFG cond + 0.4 (cond - uncond).
    c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", steps=nfe, cfg_scale=0.4,
                                               skip_type="time_uniform", batch_cfg=True))
    router = ""
    if l2c:  # the released router where there is one, else where train_router.py's README command writes
        released = RELEASED_ROUTERS.get((image_size, nfe)) if model == "U-ViT-H/2" else None
        router = released or f"ckpt/router_uvit_{tag}_{image_size}_dpm{nfe}"
    c.router = ml_collections.ConfigDict(dict(checkpoint=router, kind="uvit-dpm2", threshold=THRESHOLD,
                                             retarget=False))  # True: a router of another step count, interpolated
    # The original sample_ldm_discrete.py's labels; set num_samples (and labels=()) for random labels.
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)
    c.num_samples = 0
    c.batch_size = 8
    c.seed = 0
    c.repeats = 5  # timed re-runs of the first batch after a warm-up run
    c.dtype = "float32"
    # static: a program per distinct mask (README's measured U-ViT figures); cond: one program with every
    # sub-layer behind lax.cond (compiles once; not yet measured for U-ViT); auto = cond on CPU and GPU, static elsewhere.
    c.schedule = ""  # "l2c:T" (the router at threshold T) or "full"; U-ViT has no other caching method yet
    c.strategy = "static"
    c.workdir = f"out/uvit_{tag}_{image_size}_nfe{nfe}{'_l2c' if l2c else ''}"
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
    c = base(nfe=10)
    c.model = common.model("uvit", random_init=True, init_seed=0, arch_fields=dict(
        img_size=16, patch_size=2, in_chans=3, embed_dim=64, depth=4, num_heads=4, num_classes=11))  # 10 + null
    c.vae.checkpoint = ""  # pixel space: samples are images
    c.labels = tuple(range(10))
    c.batch_size = 10
    c.repeats = 2
    c.grid_upscale = 4
    c.workdir = "out/uvit_smoke"
    return c


def digits(nfe, l2c):
    from l2c_jax.configs.digits_uvit import ARCH
    from l2c_jax.resources import asset

    c = base(nfe=nfe)
    c.model = common.model("uvit", checkpoint=asset("digits", "uvit"), arch_fields=ARCH)
    c.vae.checkpoint = ""  # pixel space: samples are images
    c.sampler.cfg_scale = 0.0  # no guidance, as the digits DiT samples
    c.router.checkpoint = asset("digits", f"router_uvit_dpm{nfe}.safetensors") if l2c else ""
    c.labels = tuple(range(10))
    c.num_samples = 100
    c.batch_size = 100
    c.repeats = 2
    c.grid_upscale = 8
    c.workdir = f"out/uvit_digits_nfe{nfe}{'_l2c' if l2c else ''}"
    return c


def get_config(arg=None):
    arg = common.variant(arg, "h2_256_nfe20")
    if arg == "smoke":
        return smoke()
    m = re.fullmatch(r"digits_nfe([1-9][0-9]*)(_l2c)?", arg)
    if m is not None and int(m[1]) >= 4 and int(m[1]) % 2 == 0:
        return digits(int(m[1]), bool(m[2]))
    m = re.fullmatch(_PATTERN, arg)
    model = m and f"U-ViT-{m['size'].upper()}/{m['patch']}"
    if model not in UVIT_VARIANTS:
        raise common.unknown("uvit_sample.py", arg, FORMS)
    return base(int(m["image"]), int(m["nfe"]), bool(m["l2c"]), model)
