"""Train a class-conditional DiT from scratch (DiT's objective, EMA, label dropout).

  python scripts/train_dit.py --config configs/digits_dit.py --workdir runs/digits_dit

Rerunning the same command resumes; the EMA model lands in WORKDIR/model.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l2c_jax.cli import run_main  # noqa: E402
from l2c_jax.configs import parse_config_flags  # noqa: E402


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from l2c_jax.training.train_dit import train_dit

    train_dit(config, workdir)


if __name__ == "__main__":
    run_main(main)
