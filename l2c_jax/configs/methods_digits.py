"""Every caching method on the shipped digits DiT, at DDIM 20 and 50 (scripts/compare_methods.py).

  python scripts/compare_methods.py --config configs/methods_digits.py --workdir out/methods_digits
  python scripts/compare_methods.py --config configs/methods_digits.py:quick   # one seed, 200 images
  python scripts/compare_methods.py --config configs/methods_digits.py:uvit    # the digits U-ViT, NFE 20 and 50

Each method of `methods` runs every listed knob (`l2c_jax.methods`): FORA's
and DeepCache's interval N, Delta-DiT's cached blocks b, SmoothCache's alpha,
fewer_steps' share of the steps, TaylorSeer's "N/order" (or "l2c/order"),
L2C's threshold ("-": the router's own) or another router of the step count
(`config.routers` ddimN_NAME: longer periods, image-free, retargeted). A knob
written "ddimN:KNOB" runs at N steps only (a layout of full steps placed for N).

`uvit` (and `uvit_quick`): the shipped digits U-ViT (configs/digits_uvit.py) with DPM-Solver-2 at NFE 20 and
50, no guidance, every copy-based method (TaylorSeer forecasts, which the U-ViT sampler does not yet): a
schedule row per model evaluation (FORA N: every N-th evaluation computes), L2C the shipped routers
(configs/router_uvit.py:digits_dpmN; `dpmN` in `routers`), fewer_steps an even NFE.
"""

import ml_collections

from l2c_jax.configs import common
from l2c_jax.configs.digits_dit import ARCH
from l2c_jax.resources import asset

VARIANTS = ("", "quick", "frontier", "uvit", "uvit_quick")
PERIOD_ROUTERS = ("k3_taylor2", "k4", "k4_taylor2", "k4_taylor2_l1x5", "k6_taylor2", "k4_taylor2_learned_l1x5",
                  "k4_taylor2_learned_l1x20", "k4_taylor2_learned_l1x100", "k6_taylor2_learned_l1x5")
# At DDIM 20 (configs/router_digits.py:20_k3_taylor2 and 20_k4_taylor2, 1,000 steps; "l1x5": --config.train.l1=2.5e-4).
PERIOD_ROUTERS_20 = ("k3_taylor2", "k4_taylor2_l1x5")
IMAGE_FREE_ROUTERS = ("imagefree", "imagefree_s1", "imagefree_s2")


def get_config(arg=None):
    arg = common.variant(arg, "full")
    if arg not in ("full", "quick", "frontier", "uvit", "uvit_quick"):
        raise common.unknown("methods_digits.py", arg, ("(none)", "quick", "frontier", "uvit", "uvit_quick"))
    c = ml_collections.ConfigDict()
    c.model = common.model("dit", checkpoint=asset("digits", "dit"), arch_fields=ARCH)
    # ddimN: the router of N steps ("l2c" rows); ddimN_NAME: another one, the l2c setting NAME (rows only at N
    # steps). The shipped longer-period routers (configs/router_digits.py:50_kK_taylorO, 1,000 steps; "l1x5":
    # --config.train.l1=5e-5).
    c.routers = ml_collections.ConfigDict({f"ddim{n}": asset("digits", f"router_ddim{n}.safetensors")
                                           for n in (20, 50)})
    for name in PERIOD_ROUTERS:
        c.routers[f"ddim50_{name}"] = asset("digits", f"router_ddim50_{name}.safetensors")
    for name in PERIOD_ROUTERS_20:
        c.routers[f"ddim20_{name}"] = asset("digits", f"router_ddim20_{name}.safetensors")
    # Image-free routers (configs/router_digits.py:N_imagefree: no images, the model's own trajectories), three
    # training seeds each; and each step count's router retargeted to the other (ddimM_fromN, l2c_jax.retarget).
    for n, other in ((20, 50), (50, 20)):
        for name in IMAGE_FREE_ROUTERS:
            c.routers[f"ddim{n}_{name}"] = asset("digits", f"router_ddim{n}_{name}.safetensors")
        c.routers[f"ddim{n}_from{other}"] = asset("digits", f"router_ddim{other}.safetensors")
    c.threshold = 0.5  # the shipped routers' threshold (configs/digits.py)
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", cfg_scale=1.0, guidance_channels=3))
    c.steps = (20, 50)
    c.methods = ml_collections.ConfigDict(dict(
        full=("-",),
        # from50@0.2 / from20@0.7: the retargeted routers at the threshold that matches the trained one's share.
        l2c=("0.3", "-", "0.7") + tuple(dict.fromkeys(PERIOD_ROUTERS + PERIOD_ROUTERS_20)) + IMAGE_FREE_ROUTERS
        + ("from50", "from50@0.2", "from20", "from20@0.7"),
        fora=(2, 3, 4),
        delta_dit=(3, 6, 9),
        deepcache=(2, 3, 5),
        smoothcache=(0.05, 0.1, 0.2, 0.3),
        error_ranked=("l2c", 0.5, 0.35),
        random=(0, 1),
        fewer_steps=(0.35, 0.5, 0.7),
        # warp...: full steps placed sparse early, dense late (docs/learned_forecasts.md); a "ddimN:" setting
        # runs at N steps only.
        taylorseer=("2/1", "2/2", "3/2", "4/2", "6/2", "l2c/2", "ddim50:warp13^0.6@48/2", "ddim50:warp10^0.6@46/2",
                    "ddim20:warp7^0.6@17/2"),
    ))
    # Every forecasting schedule again with its history (d1, d2) in these dtypes (the cache stays float32).
    c.history_dtypes = ("bfloat16",)
    c.only = ""  # e.g. "full,l2c,fora": run only these methods
    c.bfloat16_rows = True  # full and L2C in bfloat16 as well
    c.num_samples = 1000
    c.seeds = (0, 1, 2)
    # SmoothCache / error_ranked calibrate on num_samples full trajectories; an anchor search ("searchC/2")
    # compares search_samples images with the full sampler's. Seed 1000: apart from the scored seeds' noise.
    c.calibration = ml_collections.ConfigDict(dict(num_samples=64, seed=1000, search_samples=256))
    c.repeats = 2  # timed runs per schedule after a warm-up (median)
    c.strategy = "auto"
    c.eval = ml_collections.ConfigDict(dict(features="digits"))
    c.workdir = "out/methods_digits"
    if arg == "frontier":
        # The forecasting frontier below 50% computed (README, docs/learned_forecasts.md): the best learned
        # routers against TaylorSeer with even, warped and searched full steps (the search runs on the
        # calibration noise, seed 1000, apart from the scored seeds).
        c.only = "full,l2c,taylorseer"
        c.methods.l2c = ("-", "k3_taylor2", "k4_taylor2_l1x5")
        c.methods.taylorseer = ("2/2", "3/2", "4/2", "6/2", "ddim50:warp13^0.6@48/2", "ddim50:search13/2",
                                "ddim50:warp10^0.6@46/2", "ddim50:search10/2", "ddim20:warp7^0.6@17/2",
                                "ddim20:search7/2")
        c.history_dtypes = ()
        c.bfloat16_rows = False
        c.paired_picture = True  # pareto.png: the paired FID gap and PSNR to full (README, the frontier)
        c.workdir = "out/methods_digits_frontier"
    if arg.startswith("uvit"):
        from l2c_jax.configs.digits_uvit import ARCH as UVIT_ARCH

        c.model = common.model("uvit", checkpoint=asset("digits", "uvit"), arch_fields=UVIT_ARCH)
        # dpmN: the router of NFE N; dpmM_fromN: the router of NFE N retargeted to M (l2c_jax.retarget).
        c.routers = ml_collections.ConfigDict({f"dpm{n}": asset("digits", f"router_uvit_dpm{n}.safetensors")
                                               for n in (20, 50)})
        for n, other in ((20, 50), (50, 20)):
            c.routers[f"dpm{n}_from{other}"] = asset("digits", f"router_uvit_dpm{other}.safetensors")
            # configs/router_uvit.py:digits_dpmN_imagefree: no images, the model's own trajectories.
            c.routers[f"dpm{n}_imagefree"] = asset("digits", f"router_uvit_dpm{n}_imagefree.safetensors")
        c.threshold = 0.9  # the U-ViT routers' (configs/router_uvit.py)
        c.sampler = ml_collections.ConfigDict(dict(name="dpm_solver2", cfg_scale=0.0, skip_type="time_uniform"))
        c.only = "full,l2c,fora,delta_dit,deepcache,smoothcache,error_ranked,random,fewer_steps"
        c.methods.l2c = ("0.5", "-", "0.99", "imagefree", "from50", "from20")
        c.methods.delta_dit = (3, 6, 9)
        c.methods.taylorseer = ()
        c.history_dtypes = ()
        c.bfloat16_rows = False
        c.workdir = "out/methods_digits_uvit"
    if arg in ("quick", "uvit_quick"):
        c.num_samples = 200
        c.seeds = (0,)
        c.repeats = 1
        c.workdir += "_quick" if arg == "uvit_quick" else ""
        c.workdir = "out/methods_digits_quick" if arg == "quick" else c.workdir
    return c
