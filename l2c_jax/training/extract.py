"""Precomputing VAE posteriors of a dataset (scripts/extract_latents.py)."""

from __future__ import annotations

import json
import os

import numpy as np

from l2c_jax.errors import ConfigError


def extract_latents(config, workdir: str, batch_size: int = 32, report=print) -> str:
    from tqdm.auto import tqdm

    from l2c_jax.training.data import make_source, to_model_range
    from l2c_jax.vae import load_vae

    if not config.vae.get("checkpoint"):
        raise ConfigError("config.vae.checkpoint is empty: latents need the VAE")
    if config.data.get("latents"):
        raise ConfigError("config.data.latents is set: extract from images (data.image_folder or data.tfds_name)")
    vae = load_vae(config.vae.checkpoint)
    source = make_source(config.data, int(config.data.image_size))
    flips = (False, True) if config.data.get("flip") else (False,)
    n = len(source) * len(flips)
    os.makedirs(workdir, exist_ok=True)
    f = int(config.data.image_size) // vae.downsample_factor
    moments = np.lib.format.open_memmap(os.path.join(workdir, "moments.npy.partial"), mode="w+",
                                        dtype=np.float32, shape=(n, f, f, 2 * vae.config.z_channels))
    labels = np.zeros((n,), np.int64)
    k = 0
    for start in tqdm(range(0, len(source), batch_size), desc="encoding"):
        items = [source.load(i) for i in range(start, min(start + batch_size, len(source)))]
        imgs = np.stack([x for x, _ in items])
        ys = np.asarray([y for _, y in items])
        for flip in flips:
            batch = to_model_range(imgs[:, :, ::-1] if flip else imgs)
            mean, logvar = vae.encode(batch)
            moments[k:k + len(ys)] = np.concatenate([np.asarray(mean), np.asarray(logvar)], -1)
            labels[k:k + len(ys)] = ys
            k += len(ys)
    moments.flush()
    del moments
    os.replace(os.path.join(workdir, "moments.npy.partial"), os.path.join(workdir, "moments.npy"))
    np.save(os.path.join(workdir, "labels.npy"), labels)
    with open(os.path.join(workdir, "latents.json"), "w") as fh:
        json.dump(dict(count=n, image_size=int(config.data.image_size), latent_size=f,
                       z_channels=vae.config.z_channels, flipped_copies=len(flips) == 2,
                       vae=os.path.abspath(config.vae.checkpoint)), fh, indent=2)
    report(f"wrote {n} latents ({f}x{f}x{vae.config.z_channels}) to {workdir}")
    return workdir
