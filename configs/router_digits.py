"""Router training for the shipped digits DiT (pixel space, no VAE).

  python scripts/train_router.py --config configs/router_digits.py:20 --workdir runs/router_digits20
"""

import ml_collections

from configs.router_dit import get_config as _dit


def get_config(arg="20"):
    steps = int(arg or 20)
    c = _dit("xl2_256_ddim20")
    c.model.checkpoint = "assets/digits/dit"
    c.vae.checkpoint = ""
    c.data.tfds_name = "sklearn_digits"
    c.data.image_size = 8
    c.data.flip = False
    c.sampler.steps = steps
    c.router.threshold = 0.5
    c.train.batch_size = 64
    c.train.steps = 3_000
    c.train.lr = 1e-2
    c.train.l1 = 2e-4
    c.train.log_every = 250
    c.train.checkpoint_every = 1_000
    return c
