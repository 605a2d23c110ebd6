"""Router training for DiT + DDIM (scripts/train_router.py, scripts/extract_latents.py).

  python scripts/train_router.py --config configs/router_dit.py:xl2_256_ddim20 --workdir runs/ddim20 \\
      --config.data.image_folder=/data/imagenet/train
  python scripts/train_router.py --config configs/router_dit.py:smoke --workdir /tmp/r \\
      --config.data.image_folder=DIR                       # tiny random DiT, CPU, seconds

- `MODEL_SIZE_ddimN`: a row of the released hyper-parameter table
  (REFERENCE.md): xl2_256_ddim{10,20,50}, xl2_512_ddim50, l2_256_ddim{20,50}.
  Global batch 64, AdamW (wd 0), router clamped to [-5, 5] after each step.
- `smoke`: a tiny random pixel-space DiT (16x16 RGB, 2 blocks), no VAE, 20
  steps at batch 4: the training loop end to end on a CPU (the tests point it
  at a converted fixture with `--config.model.checkpoint=DIR
  --config.model.random_init=False`).

- `_imagefree` after any of them (`xl2_256_ddim20_imagefree`, `smoke_imagefree`):
  no images, no VAE pass: the router trains on the model's own full DDIM
  trajectories, recorded into WORKDIR/trajectories first (data.num_trajectories,
  2,048 by default; data.trajectory_cfg_scale for guided ones); `smoke_imagefree`
  needs nothing at all.

Without a variant: xl2_256_ddim20.
"""

import re

import ml_collections

from l2c_jax.configs import common
from l2c_jax.training.data import data_config

# (model, image size, DDIM steps) -> (l1 weight, lr, inference threshold), the released settings.
TABLE = {
    ("xl2", 256, 50): (1e-6, 1e-3, 0.1),
    ("xl2", 256, 20): (5e-6, 1e-3, 0.1),
    ("xl2", 256, 10): (1e-6, 1e-3, 0.1),
    ("xl2", 512, 50): (5e-6, 1e-3, 0.9),
    ("l2", 256, 50): (1e-6, 1e-3, 0.1),
    ("l2", 256, 20): (5e-6, 1e-2, 0.1),
}
VARIANTS = tuple(f"{t}_{s}_ddim{n}" for t, s, n in TABLE) + ("smoke",)
VARIANTS += tuple(v + common.IMAGE_FREE for v in VARIANTS)
FORMS = VARIANTS[:len(VARIANTS) // 2] + ("any of them + _imagefree (no images: the model's own trajectories)",)
_NAMES = {"xl2": "DiT-XL/2", "l2": "DiT-L/2"}


def base(tag="xl2", size=256, steps=20):
    l1, lr, thr = TABLE[(tag, size, steps)]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model("dit", checkpoint=f"ckpt/dit_{tag}_{size}", name=_NAMES[tag],
                           arch_fields=dict(input_size=size // 8))
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/sd-vae-ft-ema", scale=0.18215))
    c.data = data_config(image_size=size)  # image folder, TFDS or stored latents: l2c_jax.training.data
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps))
    # period: a full step then period-1 cache steps (2: the released L2C); forecast: copy | taylor1 | taylor2.
    c.router = ml_collections.ConfigDict(dict(threshold=thr, period=2, forecast="copy"))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, steps=20_000, lr=lr, l1=l1, label_dropout=0.1, ste_threshold=None,
        log_every=100, checkpoint_every=1_000, keep_checkpoints=3,
    ))
    return c


def smoke():
    c = base()
    c.model = common.model("dit", random_init=True, arch_fields=dict(
        input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
        num_classes=4, learn_sigma=True, class_dropout_prob=0.1, mlp_ratio=4.0))
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
    arg, imagefree = common.split_image_free(common.variant(arg, "xl2_256_ddim20"))
    c = _variant(arg)
    return common.image_free(c) if imagefree else c


def _variant(arg):
    if arg == "smoke":
        return smoke()
    m = re.fullmatch(r"(xl2|l2)_(256|512)_ddim([1-9][0-9]*)", arg)
    if m is None or (m[1], int(m[2]), int(m[3])) not in TABLE:
        raise common.unknown("router_dit.py", arg, FORMS)
    return base(m[1], int(m[2]), int(m[3]))
