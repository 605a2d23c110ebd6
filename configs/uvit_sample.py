"""U-ViT sampling (scripts/sample.py): the shared base of the uvit_* configs.

`get_config("h2_256_nfe20_l2c")` reads the variant from its argument:
model size + image size + NFE (model evaluations per branch; DPM-Solver-2
takes NFE // 2 steps), with `_l2c` for the learned cache. The checkpoint
paths below are where the README's conversion commands write; the released
routers are read as they are (`.pth`), or convert them with convert/router.py.
"""

import ml_collections

# The released routers: U-ViT-H/2 256 with DPM-Solver-2 at NFE 20 and 50, threshold 0.9;
# other NFE need a router trained with scripts/train_router.py (configs/router_uvit.py).
RELEASED_ROUTERS = {(256, 20): "ckpt/dpm20_router.pth", (256, 50): "ckpt/dpm50_router.pth"}
THRESHOLD = 0.9


def base(image_size=256, nfe=20, l2c=False, model="U-ViT-H/2"):
    c = ml_collections.ConfigDict()
    tag = model.replace("U-ViT-", "").replace("/", "").lower()
    c.model = ml_collections.ConfigDict(dict(checkpoint=f"ckpt/uvit_{tag}_{image_size}", random_init=False))
    # U-ViT's own autoencoder_kl_ema.pth (LDM naming), latents scaled by 0.18215.
    c.vae = ml_collections.ConfigDict(dict(checkpoint="ckpt/uvit_autoencoder", scale=0.18215, decode_chunk=16))
    # DPM-Solver-2 singlestep (data prediction), time-uniform steps, SD betas; CFG cond + 0.4 (cond - uncond).
    c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", steps=nfe, cfg_scale=0.4,
                                               skip_type="time_uniform", batch_cfg=True))
    c.router = ml_collections.ConfigDict(dict(
        checkpoint=(RELEASED_ROUTERS.get((image_size, nfe), f"ckpt/router_uvit_{tag}_{image_size}_dpm{nfe}")
                    if l2c else ""),
        kind="uvit-dpm2", threshold=THRESHOLD))
    # The original sample_ldm_discrete.py's labels; set num_samples (and labels=()) for random labels.
    c.labels = (207, 992, 387, 974, 142, 979, 417, 279)
    c.num_samples = 0
    c.batch_size = 8
    c.seed = 0
    c.repeats = 5  # timed re-runs of the first batch after a warm-up run
    c.dtype = "float32"
    c.workdir = f"out/uvit_{tag}_{image_size}_nfe{nfe}{'_l2c' if l2c else ''}"
    c.grid = "samples.png"
    c.grid_max = 64
    c.grid_upscale = 1
    c.npz = ""  # e.g. "samples.npz" for the ADM evaluator
    return c


def get_config(arg="h2_256_nfe20"):
    parts = arg.split("_")
    l2c = parts[-1] == "l2c"
    if l2c:
        parts = parts[:-1]
    if len(parts) != 3 or not parts[2].startswith("nfe"):
        raise ValueError(f"expected MODEL_SIZE_nfeN[_l2c], e.g. h2_256_nfe20_l2c; got {arg!r}")
    size_tag, image_size, nfe = parts[0], int(parts[1]), int(parts[2].replace("nfe", ""))
    model = {"h2": "U-ViT-H/2", "h4": "U-ViT-H/4", "l2": "U-ViT-L/2", "l4": "U-ViT-L/4"}[size_tag]
    return base(image_size, nfe, l2c, model)
