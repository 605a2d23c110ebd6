"""Encode a dataset once with the VAE, for router training on precomputed latents.

  python scripts/extract_latents.py --config configs/router_dit_xl2_256_ddim20.py --workdir latents/imagenet256 \
      --config.data.image_folder=/data/imagenet/train

Writes WORKDIR/moments.npy (N, h, w, 2C: the posterior mean and log-variance,
so training still samples the posterior), labels.npy and latents.json; train
with --config.data.latents=WORKDIR. Images are center-cropped as for
training, without a flip (pass --config.data.flip=True to store a flipped copy
of every image too, as U-ViT's feature extraction does).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l2c_jax.cli import run_main  # noqa: E402
from l2c_jax.configs import parse_config_flags  # noqa: E402


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    from l2c_jax.training.extract import extract_latents

    extract_latents(config, workdir)


if __name__ == "__main__":
    run_main(main)
