"""Router training for U-ViT + DPM-Solver-2 (scripts/train_router.py).

  python scripts/train_router.py --config configs/router_uvit.py:h2_256_dpm20 --workdir runs/dpm20 \\
      --config.data.image_folder=/data/imagenet/train
  python scripts/train_router.py --config configs/router_uvit.py:smoke --workdir /tmp/r \\
      --config.data.image_folder=DIR                       # tiny random U-ViT, CPU, seconds

- `h2_256_dpmN`: a released setting, N = 20 or 50 (NFE). As the original
  `U-ViT/train_router_discrete.py` with `configs/imagenet256_uvit_huge_router.py`:
  global batch 64, 40k steps, AdamW (betas 0.9/0.999, wd 0) at a constant
  lr 1e-3, l1 weight 0.1 on a per-sample SUM-of-squares loss, label dropout
  0.1 to the null class, no guidance during training, and no clamping of the
  router parameters (the released dpm20 / dpm50 routers reach |prob| ~ 18).
  The router has NFE rows, as the released ones; rows 1..NFE//2-1 train
  (the first evaluation of each solver step after the first).
- `digits_dpmN`: the shipped digits U-ViT (assets/digits/uvit, pixel space,
  no VAE) at NFE N (even, >= 4; 20 and 50 are the shipped routers
  assets/digits/router_uvit_dpm{20,50}.safetensors): 1,500 steps at lr 1e-2
  as the digits DiT's routers, the released l1 weight scaled by the pixels a
  sample's sum of squares covers (64 against 4,096 latents: 0.1 -> 1.6e-3).
- `smoke`: a tiny random pixel-space U-ViT (16x16 RGB, 3 blocks), no VAE,
  NFE 10, 20 steps at batch 4: the U-ViT training loop on a CPU.

- `_imagefree` after any of them (`h2_256_dpm20_imagefree`, `smoke_imagefree`):
  no images: the router trains on the model's own DPM-Solver-2 trajectories
  (one state per solver step), recorded into WORKDIR/trajectories first.

Without a variant: h2_256_dpm20.
"""

import re

import ml_collections

from l2c_jax.configs import common
from l2c_jax.training.data import data_config

# (model, image size, NFE) -> (l1 weight, lr, inference threshold), the released settings.
TABLE = {
    ("h2", 256, 20): (0.1, 1e-3, 0.9),
    ("h2", 256, 50): (0.1, 1e-3, 0.9),
}
_BASE = tuple(f"{t}_{s}_dpm{n}" for t, s, n in TABLE) + ("smoke", "digits_dpm20", "digits_dpm50")
VARIANTS = _BASE + tuple(v + common.IMAGE_FREE for v in _BASE)
FORMS = _BASE[:3] + ("digits_dpmN, N even >= 4: the shipped digits U-ViT",
                     "any of them + _imagefree (no images: the model's own trajectories)")
_NAMES = {"h2": "U-ViT-H/2"}


def base(tag="h2", size=256, nfe=20):
    l1, lr, thr = TABLE[(tag, size, nfe)]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model("uvit", checkpoint=f"ckpt/uvit_{tag}_{size}", name=_NAMES[tag],
                           arch_fields=dict(img_size=size // 8))
    # U-ViT's autoencoder_kl_ema.pth (LDM naming), converted with convert/vae.py.
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/uvit_autoencoder", scale=0.18215))
    c.data = data_config(image_size=size)  # image folder, TFDS or stored latents: l2c_jax.training.data
    # NFE = model evaluations per sample; DPM-Solver-2 singlestep takes NFE // 2 time-uniform steps.
    c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", steps=nfe, skip_type="time_uniform"))
    c.router = ml_collections.ConfigDict(dict(threshold=thr))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, steps=40_000, lr=lr, l1=l1, label_dropout=0.1, ste_threshold=None,
        clamp=ml_collections.config_dict.placeholder(float),  # None: no clamping, as the original U-ViT script
        log_every=100, checkpoint_every=1_000, keep_checkpoints=3,
    ))
    return c


def smoke():
    c = base()
    c.model = common.model("uvit", random_init=True, arch_fields=dict(
        img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5))  # 4 + null
    c.vae.checkpoint = ""
    c.data.image_size = 16
    c.sampler.steps = 10
    c.train.batch_size = 4
    c.train.steps = 20
    c.train.lr = 1e-2
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.data.num_trajectories = 16  # smoke_imagefree: a few trajectories, recorded in seconds
    c.data.trajectory_batch_size = 8
    return c


def get_config(arg=None):
    arg, imagefree = common.split_image_free(common.variant(arg, "h2_256_dpm20"))
    c = _variant(arg)
    return common.image_free(c) if imagefree else c


def digits(nfe):
    from l2c_jax.configs.digits_uvit import ARCH
    from l2c_jax.resources import asset

    c = base()
    c.model = common.model("uvit", checkpoint=asset("digits", "uvit"), arch_fields=ARCH)
    c.vae.checkpoint = ""
    c.data = data_config(image_size=8, tfds_name="sklearn_digits", flip=False)
    c.sampler.steps = nfe
    c.train.update(dict(steps=1_500, lr=1e-2, l1=1.6e-3, log_every=250, checkpoint_every=1_000))
    return c


def _variant(arg):
    if arg == "smoke":
        return smoke()
    m = re.fullmatch(r"digits_dpm([1-9][0-9]*)", arg)
    if m is not None and int(m[1]) >= 4 and int(m[1]) % 2 == 0:
        return digits(int(m[1]))
    m = re.fullmatch(r"(h2)_(256)_dpm([1-9][0-9]*)", arg)
    if m is None or (m[1], int(m[2]), int(m[3])) not in TABLE:
        raise common.unknown("router_uvit.py", arg, FORMS)
    return base(m[1], int(m[2]), int(m[3]))
