"""The shipped small U-ViT: a class-conditional U-ViT on scikit-learn's 8x8 digits, in pixel space.

  python scripts/train_dit.py --config configs/digits_uvit.py --workdir runs/digits_uvit   # 6k steps

13 blocks (6 in, the mid block, 6 out with long skips; 26 cacheable
sub-layers), width 64, patch 2 (16 tokens + the time and label tokens), the
U-ViT objective (eps MSE over the Stable-Diffusion discrete VP schedule its
samplers use, label dropout 0.1): the digits DiT's counterpart for the U-ViT
family. The weights under assets/digits/uvit come from this config;
configs/uvit_sample.py:digits_nfeN samples them. `tiny`: 3 blocks, 20 steps, for tests.
"""

import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.digits_dit import training

VARIANTS = ("", "tiny")
# The architecture, every UViTConfig field that differs from U-ViT-H/2's (11 label rows: 10 digits + null).
ARCH = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=12, num_heads=4, mlp_ratio=4.0,
            qkv_bias=False, mlp_time_embed=False, num_classes=11, conv=False, skip=True)


def get_config(arg=None):
    arg = common.variant(arg, "")
    if arg not in VARIANTS:
        raise common.unknown("digits_uvit.py", arg, ("none", "tiny"))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model("uvit", arch_fields=ARCH, random_init=True, init_seed=0)  # trained from scratch
    c.data = ml_collections.ConfigDict(dict(tfds_name="sklearn_digits", image_size=8, flip=False))
    c.train = training()  # the digits DiT's
    if arg == "tiny":
        c.model.arch.depth = 2
        c.model.arch.embed_dim = 32
        c.train.update(dict(steps=20, batch_size=16, log_every=10, checkpoint_every=10))
    return c
