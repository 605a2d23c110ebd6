"""Router training for DiT + DDIM (scripts/train_router.py).

`--config configs/router_dit.py:xl2_256_ddim20` picks a row of the released
hyper-parameter table (REFERENCE.md); without an argument, DiT-XL/2 256 DDIM 20.
Global batch 64, AdamW (wd 0), router clamped to [-5, 5] after each step.
"""

import ml_collections

from l2c_jax.training.data import data_config

# (model, image size, DDIM steps) -> (l1 weight, lr, inference threshold), the released settings.
TABLE = {
    ("xl2", 256, 50): (1e-6, 1e-3, 0.1),
    ("xl2", 256, 20): (5e-6, 1e-3, 0.1),
    ("xl2", 256, 10): (1e-6, 1e-3, 0.1),
    ("xl2", 512, 50): (5e-6, 1e-3, 0.9),
    ("l2", 256, 50): (1e-6, 1e-3, 0.1),
    ("l2", 256, 20): (5e-6, 1e-2, 0.1),
}


def get_config(arg="xl2_256_ddim20"):
    tag, size, steps = arg.split("_")
    size, steps = int(size), int(steps.replace("ddim", ""))
    if (tag, size, steps) not in TABLE:
        raise ValueError(f"no released setting for {arg}; known: "
                         + ", ".join(f"{t}_{s}_ddim{n}" for t, s, n in TABLE))
    l1, lr, thr = TABLE[(tag, size, steps)]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(checkpoint=f"ckpt/dit_{tag}_{size}", random_init=False))
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/sd-vae-ft-ema", scale=0.18215))
    c.data = data_config(image_size=size)  # image folder, TFDS or stored latents: l2c_jax.training.data
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps))
    c.router = ml_collections.ConfigDict(dict(threshold=thr))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, steps=20_000, lr=lr, l1=l1, label_dropout=0.1, ste_threshold=None,
        log_every=100, checkpoint_every=1_000, keep_checkpoints=3,
    ))
    return c
