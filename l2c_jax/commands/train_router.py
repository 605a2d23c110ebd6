"""Train a Learning-to-Cache router for a frozen diffusion model.

  python scripts/train_router.py --config configs/router_dit.py:xl2_256_ddim20 --workdir runs/ddim20 \
      --config.data.image_folder=/data/imagenet/train
  python scripts/train_router.py --config configs/router_uvit.py:h2_256_dpm20 --workdir runs/dpm20 \
      --config.data.image_folder=/data/imagenet/train

Rerunning the same command resumes from the latest checkpoint in WORKDIR.
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main
from l2c_jax.distributed import log_format


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    import logging

    # Our progress lines only; orbax and absl narrate every checkpoint at INFO.
    logging.basicConfig(level=logging.WARNING, format=log_format("%(asctime)s %(message)s"))
    from l2c_jax.training.trainer import train_router

    train_router(config, workdir)


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
