"""Precomputing VAE posteriors of a dataset (scripts/extract_latents.py)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from l2c_jax.errors import ConfigError


def extract_latents(config, workdir: str, batch_size: int = 32, report=print) -> str:
    """Encodes the dataset into WORKDIR/moments.npy and labels.npy (see scripts/extract_latents.py).

    With several processes each encodes every P-th batch on its own devices
    into the same files (a filesystem all processes share), at the rows a
    one-process run would write; process 0 creates and finishes them.
    """
    from l2c_jax import distributed

    if not config.vae.get("checkpoint"):
        raise ConfigError("config.vae.checkpoint is empty: latents need the VAE")
    if config.data.get("latents"):
        raise ConfigError("config.data.latents is set: extract from images (data.image_folder or data.tfds_name)")
    report = distributed.main_only(report)
    with distributed.hold_workdir(workdir, "latents"):  # before loading anything
        return _extract(config, workdir, batch_size, report)


def _extract(config, workdir: str, batch_size: int, report) -> str:
    from tqdm.auto import tqdm

    from l2c_jax import distributed, parallel
    from l2c_jax.training.data import make_source, to_model_range
    from l2c_jax.vae import load_vae

    vae = load_vae(config.vae.checkpoint, mesh=parallel.local_mesh())  # encoding needs no other process
    source = make_source(config.data, int(config.data.image_size))
    flips = (False, True) if config.data.get("flip") else (False,)
    n = len(source) * len(flips)
    f = int(config.data.image_size) // vae.downsample_factor
    part = {name: os.path.join(workdir, f"{name}.npy.partial") for name in ("moments", "labels")}
    shapes = dict(moments=((n, f, f, 2 * vae.config.z_channels), np.float32), labels=((n,), np.int64))
    if distributed.is_main():
        os.makedirs(workdir, exist_ok=True)
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(part[name], mode="w+", dtype=dtype, shape=shape).flush()
    distributed.barrier("l2c-latents-created")
    moments = np.lib.format.open_memmap(part["moments"], mode="r+")
    labels = np.lib.format.open_memmap(part["labels"], mode="r+")
    starts = list(range(0, len(source), batch_size))[jax.process_index()::jax.process_count()]
    for start in tqdm(starts, desc="encoding", disable=not distributed.is_main()):
        items = [source.load(i) for i in range(start, min(start + batch_size, len(source)))]
        imgs = np.stack([x for x, _ in items])
        ys = np.asarray([y for _, y in items])
        k = start * len(flips)  # the rows of this batch: its images, then their flipped copies
        for flip in flips:
            batch = to_model_range(imgs[:, :, ::-1] if flip else imgs)
            mean, logvar = vae.encode(batch)
            moments[k:k + len(ys)] = np.concatenate([np.asarray(mean), np.asarray(logvar)], -1)
            labels[k:k + len(ys)] = ys
            k += len(ys)
    moments.flush()
    labels.flush()
    del moments, labels
    distributed.barrier("l2c-latents-written")
    if distributed.is_main():
        for name in part:
            os.replace(part[name], os.path.join(workdir, f"{name}.npy"))
        with open(os.path.join(workdir, "latents.json"), "w") as fh:
            json.dump(dict(count=n, image_size=int(config.data.image_size), latent_size=f,
                           z_channels=vae.config.z_channels, flipped_copies=len(flips) == 2,
                           vae=os.path.abspath(config.vae.checkpoint)), fh, indent=2)
    report(f"wrote {n} latents ({f}x{f}x{vae.config.z_channels}) to {workdir}")
    return workdir
