"""Every caching method on one harness: schedules, computed share, speed-up, FID over seeds, a Pareto picture.

  python scripts/compare_methods.py --config configs/methods_digits.py --workdir out/methods_digits

Writes WORKDIR/methods.json (one row per method, setting and step count) and WORKDIR/pareto.png.
"""

from __future__ import annotations

from l2c_jax.cli import parse_config_flags, run_main


def main(argv):
    config, workdir = parse_config_flags(argv, __doc__)
    from l2c_jax.compare_methods import run_methods

    run_methods(config, workdir)


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
