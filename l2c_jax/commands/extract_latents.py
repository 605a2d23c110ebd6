"""Encode a dataset once with the VAE, for router training on precomputed latents.

  python scripts/extract_latents.py --config configs/router_dit.py:xl2_256_ddim20 --workdir latents/imagenet256 \
      --config.data.image_folder=/data/imagenet/train

Writes WORKDIR/moments.npy (N, h, w, 2C: the posterior mean and log-variance,
so training still samples the posterior), labels.npy and latents.json; train
with --config.data.latents=WORKDIR. Images are center-cropped as for
training, without a flip (pass --config.data.flip=True to store a flipped copy
of every image too, as U-ViT's feature extraction does).
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main
from l2c_jax.distributed import log_format


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    import logging

    logging.basicConfig(level=logging.WARNING, format=log_format("%(levelname)s %(message)s"))
    from l2c_jax.training.extract import extract_latents

    extract_latents(config, workdir)


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
