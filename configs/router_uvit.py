"""Router training for U-ViT + DPM-Solver-2 (scripts/train_router.py).

`--config configs/router_uvit.py:h2_256_dpm50` picks a released setting;
without an argument, U-ViT-H/2 256 at NFE 20. As the original
`U-ViT/train_router_discrete.py` with `configs/imagenet256_uvit_huge_router.py`:
global batch 64, 40k steps, AdamW (betas 0.9/0.999, wd 0) at a constant
lr 1e-3, l1 weight 0.1 on a per-sample SUM-of-squares loss, label dropout
0.1 to the null class, no guidance during training, and no clamping of the
router parameters (the released dpm20 / dpm50 routers reach |prob| ~ 18).
The router has NFE rows, as the released ones; rows 1..NFE//2-1 train
(the first evaluation of each solver step after the first).
"""

import ml_collections

from l2c_jax.training.data import data_config

# (model, image size, NFE) -> (l1 weight, lr, inference threshold), the released settings.
TABLE = {
    ("h2", 256, 20): (0.1, 1e-3, 0.9),
    ("h2", 256, 50): (0.1, 1e-3, 0.9),
}


def get_config(arg="h2_256_dpm20"):
    tag, size, nfe = arg.split("_")
    size, nfe = int(size), int(nfe.replace("dpm", ""))
    if (tag, size, nfe) not in TABLE:
        raise ValueError(f"no released setting for {arg}; known: "
                         + ", ".join(f"{t}_{s}_dpm{n}" for t, s, n in TABLE))
    l1, lr, thr = TABLE[(tag, size, nfe)]
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(checkpoint=f"ckpt/uvit_{tag}_{size}", random_init=False))
    # U-ViT's autoencoder_kl_ema.pth (LDM naming), converted with convert/vae.py.
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/uvit_autoencoder", scale=0.18215))
    c.data = data_config(image_size=size)  # image folder, TFDS or stored latents: l2c_jax.training.data
    # NFE = model evaluations per sample; DPM-Solver-2 singlestep takes NFE // 2 time-uniform steps.
    c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", steps=nfe, skip_type="time_uniform"))
    c.router = ml_collections.ConfigDict(dict(threshold=thr))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, steps=40_000, lr=lr, l1=l1, label_dropout=0.1, ste_threshold=None,
        clamp=ml_collections.config_dict.placeholder(float),  # None: no clamping, as the original U-ViT script
        log_every=100, checkpoint_every=1_000, keep_checkpoints=3,
    ))
    return c
