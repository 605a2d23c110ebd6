"""The user's path at full size, measured phase by phase: convert -> load -> compile -> sample -> decode.

What a user of a released model runs, each step in a fresh process as they
run it, with random weights written in the original PyTorch format (values do
not change time or memory):

1. `write` (setup, not measured): a DiT-XL/2 or U-ViT-H/2 state dict saved with
   `torch.save` in the original naming, and the SD autoencoder in diffusers
   (DiT) or LDM (U-ViT) naming.
2. `convert`: `convert/dit.py` or `convert/uvit.py`, and `convert/vae.py`; wall
   time and peak RSS of each process.
3. `sample`: `scripts/sample.py` with the family's config, the converted
   checkpoints and the released router; its own report gives wall time and
   peak RSS per phase (load, compile, sample, decode), and the process's peak.

The result is one JSON row; `report` prints a table. The peak of the
sampling process is compared with the float32 weights of model + VAE.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, List

import numpy as np

from l2c_jax.bench.harness import machine_info, package_env
from l2c_jax.errors import ConfigError

FAMILIES = {
    # family: (arch name, converter module, model file, VAE naming, VAE file, sampling config)
    "dit": ("DiT-XL/2", "l2c_jax.commands.convert_dit", "DiT-XL-2-256x256.pt", "diffusers", "diffusion_pytorch_model.safetensors",
            "configs/dit_sample.py:xl2_256_ddim20_l2c"),
    "uvit": ("U-ViT-H/2", "l2c_jax.commands.convert_uvit", "imagenet256_uvit_huge.pth", "ldm", "autoencoder_kl_ema.pth",
             "configs/uvit_sample.py:h2_256_nfe20_l2c"),
}


def source_paths(family: str, directory: str) -> dict:
    """Where `write_random_checkpoints` puts the family's model and autoencoder files."""
    _, _, model_file, _, vae_file, _ = FAMILIES[family]
    return dict(model=os.path.join(directory, model_file), vae=os.path.join(directory, vae_file))


def write_random_checkpoints(family: str, directory: str, seed: int = 0) -> dict:
    """Random weights in the original formats (model + autoencoder); returns their paths. Skips existing files."""
    import jax
    import torch

    from l2c_jax.convert.vae import vae_state_dict
    from l2c_jax.model import Model
    from l2c_jax.models.families import family_of
    from l2c_jax.models.vae import VAEConfig, abstract_vae_params

    arch, _, _, naming, vae_file, _ = FAMILIES[family]
    os.makedirs(directory, exist_ok=True)
    paths = source_paths(family, directory)

    def save_torch(sd, path):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)

    if not os.path.exists(paths["model"]):
        # Each family's converter module also writes the original layout back (`state_dict_of`).
        state_dict_of = importlib.import_module(f"l2c_jax.convert.{family}").state_dict_of
        model = Model.random(family, family_of(family).config_cls.from_name(arch), seed)
        sd = state_dict_of(model.params)
        del model
        save_torch(sd, paths["model"])
        del sd
    if not os.path.exists(paths["vae"]):
        cfg = VAEConfig()
        abstract = abstract_vae_params(cfg)
        leaves, tree = jax.tree.flatten(abstract)
        rng = np.random.default_rng(seed)
        params = jax.tree.unflatten(tree, [(rng.standard_normal(a.shape) * 0.02).astype(np.float32) for a in leaves])
        sd = vae_state_dict(params, cfg, naming)
        if vae_file.endswith(".safetensors"):
            from safetensors.numpy import save_file
            save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, paths["vae"] + ".tmp")
            os.replace(paths["vae"] + ".tmp", paths["vae"])
        else:
            save_torch(sd, paths["vae"])
    return paths


def run_measured(cmd: List[str], log_path: str) -> dict:
    """Runs a command; its wall time, exit status and peak RSS (os.wait4)."""
    env = package_env()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    peak = int(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024))
    if p.returncode != 0:
        with open(log_path) as f:
            tail = " | ".join(f.read().strip().splitlines()[-3:])
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (exit {p.returncode}): {tail[-400:]}")
    return dict(wall_s=wall, peak_rss_bytes=peak, log=log_path)


def _tree_bytes(directory: str) -> int:
    """float32 bytes of a converted model (its config's parameter shapes)."""
    import jax

    from l2c_jax import checkpoint
    from l2c_jax.model import abstract_params, family_of
    from l2c_jax.models.vae import VAEConfig, abstract_vae_params

    meta = checkpoint.read_model_meta(directory)
    if meta["family"] == "vae":
        tree = abstract_vae_params(VAEConfig.from_dict(meta["config"]))
    else:
        tree = abstract_params(meta["family"], family_of(meta["family"])[0](**meta["config"]))
    return int(sum(np.prod(a.shape) * 4 for a in jax.tree.leaves(tree)))


def run_user_path(config, report: Callable = print) -> dict:
    """Writes (if needed), converts and samples at full size; returns the measured row."""
    family = config.family
    if family not in FAMILIES:
        raise ConfigError(f"user_path benchmarks families {', '.join(FAMILIES)}, not {family!r}")
    arch, converter, _, _, _, sample_config = FAMILIES[family]
    schedule = config.get("schedule") or ""
    if not schedule and (not config.get("router") or not os.path.exists(config.router)):
        raise ConfigError(f"config.router: the released router file is needed ({config.get('router') or 'unset'}), "
                          "or a caching method's schedule (config.schedule)")
    work = os.path.abspath(config.workdir)
    os.makedirs(work, exist_ok=True)
    py = sys.executable

    report(f"writing random {arch} + autoencoder checkpoints in the original formats under {work} ...")
    run_measured([py, "-c", "import sys; from l2c_jax.bench.user_path import write_random_checkpoints as w; "
                        "w(sys.argv[1], sys.argv[2])", family, os.path.join(work, "source")],
                       os.path.join(work, "write.log"))
    paths = source_paths(family, os.path.join(work, "source"))
    model_dir, vae_dir = os.path.join(work, "ckpt", "model"), os.path.join(work, "ckpt", "vae")
    shutil.rmtree(os.path.join(work, "ckpt"), ignore_errors=True)  # converted afresh every run: that is measured
    row = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), family=family,
               arch=arch, machine=machine_info(), batch_size=int(config.batch_size))
    conv = [py, "-m", converter, "--checkpoint", paths["model"], "--model", arch, "--out", model_dir]
    row["convert_model"] = run_measured(conv, os.path.join(work, "convert_model.log"))
    row["convert_vae"] = run_measured([py, "-m", "l2c_jax.commands.convert_vae", "--checkpoint", paths["vae"], "--out", vae_dir],
                                      os.path.join(work, "convert_vae.log"))
    weights = dict(model=_tree_bytes(model_dir), vae=_tree_bytes(vae_dir))
    row["weights_bytes"] = weights
    labels = ", ".join(str(i) for i in range(207, 207 + int(config.batch_size)))
    cmd = [py, "-m", "l2c_jax.commands.sample", "--config", sample_config, f"--config.model.checkpoint={model_dir}",
           f"--config.vae.checkpoint={vae_dir}", f"--config.router.checkpoint={'' if schedule else config.router}",
           f"--config.schedule={schedule}",
           f"--config.batch_size={int(config.batch_size)}", f"--config.labels=({labels},)",
           f"--config.repeats={int(config.repeats)}", f"--config.dtype={config.get('dtype', 'float32')}",
           "--workdir", os.path.join(work, "samples"), f"--config.strategy={config.get('strategy', 'auto')}",
           "--config.overwrite=True"]  # samples/ is this benchmark's, like ckpt/: every run replaces it
    if config.get("history_dtype"):
        cmd.append(f"--config.history_dtype={config.history_dtype}")
    row["command"] = " ".join(["l2c-sample"] + cmd[3:])
    row["sample"] = run_measured(cmd, os.path.join(work, "sample.log"))
    with open(os.path.join(work, "samples", "report.json")) as f:
        job = json.load(f)
    row["sample"]["phases"] = job["phases"]
    row["sample"]["latency_mean_s"] = job["latency_mean"]
    row["sample"]["computed_share"] = job["computed_share"]
    row["sample"]["schedule"] = job.get("schedule")
    row["sample"]["history_bytes"] = job.get("history_bytes")
    row["sample"]["history_bytes_all_units"] = job.get("history_bytes_all_units")
    total = weights["model"] + weights["vae"]
    row["sample"]["peak_over_weights"] = row["sample"]["peak_rss_bytes"] / total

    gib = 2.0 ** 30
    report(f"{arch} 256 px + autoencoder, batch {row['batch_size']}, float32 weights "
           f"{weights['model'] / gib:.2f} + {weights['vae'] / gib:.2f} GiB, schedule {job.get('schedule')}")
    if job.get("history_bytes_all_units"):
        report(f"forecast history: {job['history_bytes'] / gib:.2f} GiB at its peak "
               f"(all units in float32: {job['history_bytes_all_units'] / gib:.2f} GiB)")
    report(f"{'step':<22}{'wall (s)':>10}{'peak RSS (GiB)':>16}")
    for name, r in (("convert model", row["convert_model"]), ("convert VAE", row["convert_vae"])):
        report(f"{name:<22}{r['wall_s']:>10.1f}{r['peak_rss_bytes'] / gib:>16.2f}")
    for name, r in job["phases"].items():
        dev = "" if r["device_peak_bytes"] is None else f"   device peak {r['device_peak_bytes'] / gib:.2f} GiB"
        report(f"{'sample.py: ' + name:<22}{r['wall_s']:>10.1f}{r['peak_rss_bytes'] / gib:>16.2f}{dev}")
    report(f"{'sample.py (process)':<22}{row['sample']['wall_s']:>10.1f}{row['sample']['peak_rss_bytes'] / gib:>16.2f}"
           f"   = {row['sample']['peak_over_weights']:.2f}x the weights")
    out = config.get("output")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        report(f"appended the row to {out}")
    return row
