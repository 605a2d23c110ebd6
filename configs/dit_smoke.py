"""A tiny DiT sampled on the CPU in seconds, with no checkpoint at all.

Randomly initialised pixel-space DiT (16x16 RGB, 4 blocks): a smoke test of
the whole sampling path, and the default of the Quick start until a trained
small model ships. Override `model.checkpoint` (and `model.random_init=False`)
to sample a converted model instead.
"""

import ml_collections

from configs.dit_sample import base


def get_config(arg=None):
    c = base(image_size=16, steps=10, l2c=False)
    c.model.checkpoint = ""
    c.model.random_init = True
    c.model.arch = ml_collections.ConfigDict(dict(
        input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=4,
        num_classes=10, learn_sigma=True, class_dropout_prob=0.1, mlp_ratio=4.0))
    c.model.init_seed = 0
    c.vae.checkpoint = ""  # pixel space: samples are images
    c.labels = tuple(range(10))
    c.batch_size = 10
    c.repeats = 2
    c.grid_upscale = 4
    c.workdir = "out/dit_smoke"
    return c
