"""Sample images with a DiT or U-ViT, with or without the learned cache.

  python scripts/sample.py --config configs/dit_xl2_256_ddim20_l2c.py [--config.KEY=VALUE ...] [--workdir DIR]
  python scripts/sample.py --config configs/uvit_h2_256_nfe20_l2c.py
  python scripts/sample.py --config configs/digits.py        # shipped model: full vs L2C side by side
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from l2c_jax.cli import run_main  # noqa: E402
from l2c_jax.configs import parse_config_flags  # noqa: E402


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__)
    from l2c_jax.pipelines import run_compare, run_sampling

    if config.get("mode") == "compare":
        run_compare(config, workdir)
    else:
        run_sampling(config, workdir)


if __name__ == "__main__":
    run_main(main)
