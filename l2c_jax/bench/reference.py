"""The original PyTorch L2C code (its DiT folder) timed on the same weights, for the side-by-side rows."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from l2c_jax.bench.harness import summarize
from l2c_jax.errors import ConfigError


def _import_original(path: str):
    """Imports the original DiT code from a checkout of its DiT folder (models/, diffusion/)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "models", "dynamic_models.py")):
        raise ConfigError(f"torch_reference={path} is not the original DiT folder (no models/dynamic_models.py)")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConfigError(f"the original DiT code needs timm ({e}); pip install timm (measurement only)") from None
    except RuntimeError as e:
        # A torchvision wheel built for another torch variant registers fake kernels for its
        # C++ ops unconditionally; timm only imports it for layers DiT does not use.
        # Declaring the two operators lets that import finish (nothing ever calls them).
        if "torchvision::" not in str(e):
            raise
        import torch
        for mod in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass
        _import_original._keep = lib
        import timm.models.vision_transformer  # noqa: F401
    from diffusion import create_diffusion
    from models import dynamic_models, models
    return models, dynamic_models, create_diffusion


def torch_reference(config, model, router, noise, y, steps: int, warmup: int, repeats: int,
                    report: Callable = print) -> dict:
    """Times the original's `ddim_sample_loop(model.forward_with_cfg, ...)`, full (`models.DiT`) and
    L2C (`dynamic_models.DiT` + `load_ranking`), on this model's weights, float32, on CUDA when
    PyTorch sees a GPU (TF32 off, as the port's "highest" matmul precision), else on the CPU."""
    import torch

    from l2c_jax.convert.dit import state_dict_of

    threads = int(config.get("torch_threads", 2))
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":  # true float32 on both sides: no TF32 in matmuls or convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    models, dynamic_models, create_diffusion = _import_original(config.torch_reference)
    cfg = model.config
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict_of(model.params).items()}
    kw = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
              hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
              class_dropout_prob=cfg.class_dropout_prob, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma)
    diffusion = create_diffusion(str(steps))
    z = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    z = torch.cat([z, z], 0).to(dev)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    yt = torch.cat([yt, torch.full_like(yt, cfg.null_class)], 0).to(dev)
    cfg_scale = float(config.sampler.cfg_scale)
    out = dict(threads=threads, torch=torch.__version__, path=os.path.abspath(config.torch_reference),
               device=str(torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"))

    def run(m, kind):
        times, cpu, lat = [], [], None
        for _ in range(warmup):  # warm-up forwards (one-time kernel and thread-pool set-up), untimed
            if kind == "l2c":
                m.reset(steps)
            m.forward_with_cfg(z, torch.full((z.shape[0],), int(diffusion.timestep_map[-1]), device=dev), yt,
                               cfg_scale)
            sync()
            report(f"  torch {kind}: warm-up forward done")
        for r in range(repeats):
            if kind == "l2c":
                m.reset(steps)  # the dynamic model counts steps down from here (full / cache by parity)
            t0, c0 = time.perf_counter(), time.process_time()
            lat = diffusion.ddim_sample_loop(m.forward_with_cfg, z.shape, z, clip_denoised=False,
                                             model_kwargs=dict(y=yt, cfg_scale=cfg_scale), progress=False,
                                             device=dev)
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times.append(dt), cpu.append(dc)
            report(f"  torch {kind} run {r + 1}/{repeats}: {dt:.2f} s")
        return summarize(times, cpu), lat[: len(lat) // 2].cpu().numpy().transpose(0, 2, 3, 1)

    with torch.inference_mode():
        m = models.DiT(**kw).eval()
        m.load_state_dict(sd)
        m.to(dev)
        out["full"], full_lat = run(m, "full")
        del m
        lat = None
        if router is not None:
            # The released files pickle an argparse.Namespace, which torch.load (weights_only)
            # refuses; the same rows are exported as plain tensors for `load_ranking`.
            from l2c_jax.router import export_torch
            tmp = tempfile.mkdtemp(prefix="l2c_router_")
            rpath = export_torch(router, os.path.join(tmp, "router.pt"))
            m = dynamic_models.DiT(**kw).eval()
            with contextlib.redirect_stdout(io.StringIO()):
                m.load_ranking(rpath, steps, diffusion.timestep_map, float(config.router.threshold))
            m.load_state_dict(sd)
            m.to(dev)
            out["l2c"], lat = run(m, "l2c")
            del m
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            out["speedup"] = out["full"]["median"] / out["l2c"]["median"]
    return out, full_lat, lat
