"""Train a Learning-to-Cache router for a frozen diffusion model.

  python scripts/train_router.py --config configs/router_dit_xl2_256_ddim20.py --workdir runs/ddim20 \
      --config.data.image_folder=/data/imagenet/train
  python scripts/train_router.py --config configs/router_uvit_h2_dpm20.py --workdir runs/dpm20 \
      --config.data.image_folder=/data/imagenet/train

Rerunning the same command resumes from the latest checkpoint in WORKDIR.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l2c_jax.cli import run_main  # noqa: E402
from l2c_jax.configs import parse_config_flags  # noqa: E402


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    import logging

    # Our progress lines only; orbax and absl narrate every checkpoint at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from l2c_jax.training.trainer import train_router

    train_router(config, workdir)


if __name__ == "__main__":
    run_main(main)
