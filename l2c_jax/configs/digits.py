"""The shipped small model: full DDIM vs DDIM + L2C vs fewer DDIM steps, side by side.

The DiT (configs/digits_dit.py) and its routers (configs/router_digits.py)
are committed under assets/digits/, so this runs on a fresh machine with
nothing downloaded:

  python scripts/sample.py --config configs/digits.py        # DDIM 20 and its router
  python scripts/sample.py --config configs/digits.py:50     # DDIM 50 and its router

The variant is the DDIM step count of a shipped router (20 or 50).
"""

import os

import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.digits_dit import ARCH
from l2c_jax.resources import asset

VARIANTS = ("20", "50")


def get_config(arg=None):
    arg = common.variant(arg, "20")
    router = asset("digits", f"router_ddim{arg}.safetensors")
    if not (arg.isdigit() and os.path.isfile(router)):  # a shipped router for that many steps
        raise common.unknown("digits.py", arg, VARIANTS)
    steps = int(arg)
    c = ml_collections.ConfigDict()
    c.mode = "compare"
    c.seed = 0
    c.model = common.model("dit", checkpoint=asset("digits", "dit"), arch_fields=ARCH)
    c.vae = ml_collections.ConfigDict(dict(checkpoint=""))
    c.router = ml_collections.ConfigDict(dict(checkpoint=router, kind="dit-ddim", threshold=0.5,
                                             retarget=False))  # True: a router of another step count, interpolated
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps, cfg_scale=1.0, eta=0.0))  # no guidance: best FID on this model
    # One pixel channel: guide all of eps (the original's 3 of 4 is a latent-space habit).
    c.sampler.guidance_channels = ml_collections.FieldReference(None, field_type=int)
    c.eval = ml_collections.ConfigDict(dict(num_samples=500, features="digits"))
    c.repeats = 3
    c.compare_steps = 0  # > 0: the plain-DDIM row runs this many steps instead of matching L2C's latency
    c.compare_cache_dtype = ""  # e.g. "bfloat16": one more L2C row with the feature cache kept in that dtype
    c.workdir = f"out/digits_ddim{steps}"
    c.grid = "compare.png"
    c.grid_upscale = 8
    return c
