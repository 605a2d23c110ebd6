"""Sample images with a DiT or U-ViT, with or without the learned cache.

  python scripts/sample.py --config configs/dit_sample.py:xl2_256_ddim20_l2c [--config.KEY=VALUE ...] [--workdir DIR]
  python scripts/sample.py --config configs/uvit_sample.py:h2_256_nfe20_l2c
  python scripts/sample.py --config configs/dit_sample.py:smoke     # tiny random DiT: seconds on a CPU
  python scripts/sample.py --config configs/digits.py        # shipped model: full vs L2C side by side
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main
from l2c_jax.distributed import log_format


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__)
    import logging

    logging.basicConfig(level=logging.WARNING, format=log_format("%(levelname)s %(message)s"))
    from l2c_jax.compare_methods import run_compare
    from l2c_jax.pipelines import run_sampling

    if config.get("mode") == "compare":
        run_compare(config, workdir)
    else:
        run_sampling(config, workdir)


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
