"""DiT sampling (scripts/sample.py): the shared base of the dit_* configs.

`get_config("xl2_256_ddim20_l2c")` reads the variant from its argument:
model size + image size + steps, with `_l2c` for the learned cache. The
checkpoint paths below are where the README's conversion commands write.
"""

import ml_collections

# The released routers exist for DiT-XL/2 256 at DDIM 20 and 50 (threshold 0.1);
# other step counts / sizes need a router trained with scripts/train_router.py.
RELEASED_ROUTERS = {(256, 20): "ckpt/DDIM20_router.pt", (256, 50): "ckpt/DDIM50_router.pt"}
THRESHOLDS = {(256, 50): 0.1, (256, 20): 0.1, (256, 10): 0.1, (512, 50): 0.9}


def base(image_size=256, steps=20, l2c=False, model="DiT-XL/2"):
    c = ml_collections.ConfigDict()
    tag = model.replace("DiT-", "").replace("/", "").lower()
    c.model = ml_collections.ConfigDict(dict(checkpoint=f"ckpt/dit_{tag}_{image_size}", random_init=False))
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/sd-vae-ft-ema", scale=0.18215, decode_chunk=16))
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=steps, cfg_scale=4.0, eta=0.0,
                                               guidance_channels=3))
    c.router = ml_collections.ConfigDict(dict(
        checkpoint=(RELEASED_ROUTERS.get((image_size, steps), f"ckpt/router_dit_{tag}_{image_size}_ddim{steps}")
                    if l2c else ""),
        kind="dit-ddim", threshold=THRESHOLDS.get((image_size, steps), 0.1)))
    # The original sample.py's labels; set num_samples (and labels=()) for random labels, e.g. 50k for FID.
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)
    c.num_samples = 0
    c.batch_size = 8
    c.seed = 0
    c.repeats = 5  # timed re-runs of the first batch after a warm-up run, as the original reports
    c.dtype = "float32"
    c.strategy = "auto"  # static | cond | scan; auto = cond on CPU, static elsewhere (BENCHMARKS.md)
    c.compilation_cache_dir = "default"  # persistent XLA cache: ~/.cache/l2c_jax/xla, a path, or "off"
    c.workdir = f"out/dit_{tag}_{image_size}_ddim{steps}{'_l2c' if l2c else ''}"
    c.grid = "samples.png"
    c.grid_max = 64
    c.grid_upscale = 1
    c.npz = ""  # e.g. "samples.npz" for the ADM evaluator
    return c


def get_config(arg="xl2_256_ddim20"):
    parts = arg.split("_")
    l2c = parts[-1] == "l2c"
    if l2c:
        parts = parts[:-1]
    size_tag, image_size, steps = parts[0], int(parts[1]), int(parts[2].replace("ddim", ""))
    model = {"xl2": "DiT-XL/2", "l2": "DiT-L/2", "b2": "DiT-B/2", "s2": "DiT-S/2"}[size_tag]
    return base(image_size, steps, l2c, model)
