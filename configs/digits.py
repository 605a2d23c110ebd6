"""The shipped small model: full DDIM vs DDIM + L2C vs fewer DDIM steps, side by side.

The DiT (configs/digits_dit.py) and its DDIM-20 router (configs/router_digits.py)
are committed under assets/digits/, so this runs on a fresh machine with
nothing downloaded: `python scripts/sample.py --config configs/digits.py`.
`configs/digits.py:50` uses the DDIM-50 router.
"""

import ml_collections


def get_config(arg="20"):
    steps = int(arg or 20)
    c = ml_collections.ConfigDict()
    c.mode = "compare"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(checkpoint="assets/digits/dit", random_init=False))
    c.vae = ml_collections.ConfigDict(dict(checkpoint=""))
    c.router = ml_collections.ConfigDict(dict(checkpoint=f"assets/digits/router_ddim{steps}.safetensors",
                                              kind="dit-ddim", threshold=0.5))
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps, cfg_scale=1.0, eta=0.0))  # no guidance: best FID on this model
    # One pixel channel: guide all of eps (the original's 3 of 4 is a latent-space habit).
    c.sampler.guidance_channels = ml_collections.FieldReference(None, field_type=int)
    c.eval = ml_collections.ConfigDict(dict(num_samples=500, features="digits"))
    c.repeats = 3
    c.compare_cache_dtype = ""  # e.g. "bfloat16": one more L2C row with the feature cache kept in that dtype
    c.workdir = f"out/digits_ddim{steps}"
    c.grid = "compare.png"
    c.grid_upscale = 8
    return c
