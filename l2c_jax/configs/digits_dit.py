"""The shipped small model: a class-conditional DiT on scikit-learn's 8x8 digits, in pixel space.

  python scripts/train_dit.py --config configs/digits_dit.py --workdir runs/digits_dit   # 6k steps, ~25 min

12 blocks (24 cacheable sub-layers), width 64, patch 2 (16 tokens): deep
enough for caching to matter, small enough to train on a CPU. No variants.
The weights under assets/digits/dit come from this config; configs/digits.py
samples them and configs/router_digits.py trains their routers.
"""

import ml_collections

from l2c_jax.configs import common

VARIANTS = ("",)
# The architecture, every DiTConfig field (train_dit builds the DiT from `model.arch`).
ARCH = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=12, num_heads=4,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)


def get_config(arg=None):
    if common.variant(arg, ""):
        raise common.unknown("digits_dit.py", arg, ("none (configs/digits_dit.py takes no variant)",))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = common.model("dit", arch_fields=ARCH, random_init=True, init_seed=0)  # trained from scratch
    c.data = ml_collections.ConfigDict(dict(tfds_name="sklearn_digits", image_size=8, flip=False))
    c.train = training()
    return c


def training():
    """The `train` section of the digits models (DiT and U-ViT alike): 6k steps of AdamW at batch 64, EMA."""
    return ml_collections.ConfigDict(dict(
        batch_size=64, steps=6_000, lr=1e-3, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999,
        label_dropout=0.1, log_every=500, checkpoint_every=2_000))
