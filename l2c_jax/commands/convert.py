"""`l2c-convert KIND ...`: one command for the converters (dit, uvit, vae, router, inception).

  l2c-convert dit --checkpoint DiT-XL-2-256x256.pt --model DiT-XL/2 --out ckpt/dit_xl2_256
  l2c-convert router --checkpoint DDIM20_router.pt --summary --threshold 0.1
"""

from __future__ import annotations

from l2c_jax.cli import run_main
from l2c_jax.commands import convert_dit, convert_inception, convert_router, convert_uvit, convert_vae
from l2c_jax.errors import ConfigError

KINDS = {"dit": convert_dit.main, "uvit": convert_uvit.main, "vae": convert_vae.main, "router": convert_router.main,
         "inception": convert_inception.main}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] not in KINDS:
        raise ConfigError(f"unknown converter {argv[0]!r}: use one of {', '.join(KINDS)}")
    return KINDS[argv[0]](argv[1:])


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
