"""Every caching method on a converted DiT (scripts/compare_methods.py), e.g. DiT-XL/2 at 256 px.

  python scripts/compare_methods.py --config configs/methods_dit.py:xl2_256 --workdir out/methods_xl2

The model, VAE and released routers are read where the README's conversion
commands put them (ckpt/dit_xl2_256, ckpt/sd-vae-ft-ema, ckpt/DDIM{20,50}_router.pt).
Quality: PSNR of the decoded images to the full sampler's from the same noise;
set --config.eval.reference=VIRTUAL_imagenet256_labeled.npz (and a converted
Inception, --config.eval.inception) for the ADM evaluator's FID of every row
(use --config.num_samples of several thousand for a meaningful FID).
"""

import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.methods_digits import get_config as digits_config

VARIANTS = ("xl2_256",)


def get_config(arg=None):
    arg = common.variant(arg, "xl2_256")
    if arg != "xl2_256":
        raise common.unknown("methods_dit.py", arg, VARIANTS)
    c = digits_config()
    c.model = common.model("dit", checkpoint="ckpt/dit_xl2_256", name="DiT-XL/2", arch_fields=dict(input_size=32))
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/sd-vae-ft-ema", scale=0.18215, decode_chunk=16))
    c.routers = ml_collections.ConfigDict({"ddim20": "ckpt/DDIM20_router.pt", "ddim50": "ckpt/DDIM50_router.pt"})
    c.threshold = 0.1  # the released routers' threshold
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", cfg_scale=1.5, guidance_channels=3))
    c.num_samples = 8
    c.calibration.num_samples = 4
    c.calibration.search_samples = 8
    c.eval = ml_collections.ConfigDict(dict(features="", reference="", inception="ckpt/inception_fid",
                                            batch_size=64))
    c.workdir = "out/methods_xl2_256"
    return c
