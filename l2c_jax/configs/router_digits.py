"""Router training for the shipped digits DiT (pixel space, no VAE).

  python scripts/train_router.py --config configs/router_digits.py:20 --workdir runs/router_digits20   # ~5 min
  python scripts/train_router.py --config configs/router_digits.py:50 --workdir runs/router_digits50

The variant is the DDIM step count N (even; 20 and 50 are the shipped
routers, assets/digits/router_ddim{20,50}.safetensors), optionally with a
cache period K > 2 and a forecast (`N_kK[_taylor1|_taylor2]`, e.g. `50_k3`,
`50_k4_taylor1`: a full step, then K-1 cache steps, each with its own row,
reused units forecast instead of copied). Without one: 20. `_learned` after a
forecast (`50_k4_taylor2_learned`) learns the forecast too: per row and unit,
the coefficients of d1 and d2, started at Taylor's (`router.learn_forecast`).
`_warpC^P@L` in place of `_kK` (`50_warp13^0.7@47_taylor2_learned`) places
C full steps at round(L (i/(C-1))^P) rather than every K-th (`router.anchors`,
`l2c_jax.schedule.anchor_layout`; docs/learned_forecasts.md).

`_imagefree` after any variant (`20_imagefree`, `50_k3_taylor2_imagefree`)
trains without the digits images, on 2,048 trajectories of the model's own
full DDIM sampler recorded into WORKDIR/trajectories first
(`l2c_jax.training.trajectories`); the shipped router_ddim{20,50}_imagefree.
"""

import re


import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.digits_dit import ARCH
from l2c_jax.resources import asset
from l2c_jax.training.data import data_config

VARIANTS = ("20", "50", "50_k3", "50_k4_taylor1", "20_imagefree", "50_imagefree")
FORMS = ("N, an even DDIM step count (20 and 50 are the shipped routers)",
         "N_kK[_taylor1|_taylor2[_learned]], a cache period K >= 2 (N any step count), a forecast, learned or not",
         "N_warpC^P[@L][_taylor1|_taylor2[_learned]], C full steps placed at L (i/(C-1))^P instead of a period",
         "any of them + _imagefree: trained on the model's own trajectories, no images")


def get_config(arg=None):
    arg, imagefree = common.split_image_free(common.variant(arg, "20"))
    m = re.fullmatch(r"(\d+)(?:_k(\d+)|_(warp\d+\^[0-9.]+(?:@\d+)?))?(?:_(taylor1|taylor2)(_learned)?)?", arg)
    period = int(m[2]) if m and m[2] else 2
    if not m or int(m[1]) < 2 or period < 2 or period > int(m[1]) or (period == 2 and not m[3] and int(m[1]) % 2):
        raise common.unknown("router_digits.py", arg, FORMS)
    steps = int(m[1])
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model("dit", checkpoint=asset("digits", "dit"), arch_fields=ARCH)
    c.vae = ml_collections.ConfigDict(dict(checkpoint="", scale=0.18215))
    c.data = data_config(image_size=8, tfds_name="sklearn_digits", flip=False)
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps))
    # anchors: full steps placed by a layout (l2c_jax.schedule.anchor_layout) rather than every period-th.
    c.router = ml_collections.ConfigDict(dict(threshold=0.5, period=period, forecast=m[4] or "copy",
                                              anchors=m[3] or ""))
    if m[5]:
        c.router.learn_forecast = True
    # As in the released table (DDIM 20: 5e-6, DDIM 50: 1e-6), more steps get a 5x smaller L1 weight.
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, steps=1_500, lr=1e-2, l1={20: 5e-5, 50: 1e-5}.get(steps, 5e-5), label_dropout=0.1,
        ste_threshold=None, log_every=250, checkpoint_every=1_000, keep_checkpoints=3,
    ))
    return common.image_free(c) if imagefree else c
