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
    c.train.steps = 1_500
    c.train.lr = 1e-2
    # As in the released table (DDIM 20: 5e-6, DDIM 50: 1e-6), more steps get a 5x smaller L1 weight.
    c.train.l1 = {20: 5e-5, 50: 1e-5}.get(steps, 5e-5)
    c.train.log_every = 250
    c.train.checkpoint_every = 1_000
    return c
