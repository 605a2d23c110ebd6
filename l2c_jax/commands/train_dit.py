"""Train a class-conditional DiT from scratch (DiT's objective, EMA, label dropout).

  python scripts/train_dit.py --config configs/digits_dit.py --workdir runs/digits_dit

Rerunning the same command resumes; the EMA model lands in WORKDIR/model.
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main
from l2c_jax.distributed import log_format


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__, workdir_required=True)
    import logging

    logging.basicConfig(level=logging.WARNING, format=log_format("%(levelname)s %(message)s"))
    from l2c_jax.training.train_dit import train_dit

    train_dit(config, workdir)


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
