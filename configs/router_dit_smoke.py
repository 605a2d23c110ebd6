"""Router training on a tiny random pixel-space DiT and a generated image folder: CPU tests."""

import ml_collections

from configs.router_dit import get_config as _base


def get_config(arg=None):
    c = _base("xl2_256_ddim20")
    c.model.checkpoint = ""
    c.model.random_init = True
    c.model.arch = ml_collections.ConfigDict(dict(
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
    return c
