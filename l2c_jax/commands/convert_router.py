"""Convert a Learning-to-Cache router between the released PyTorch files and the project format.

  python convert/router.py --checkpoint DDIM20_router.pt --kind dit-ddim --out ckpt/ddim20_router.safetensors \
      --threshold 0.1 --summary
  python convert/router.py --checkpoint dpm50_router.pth --threshold 0.9 --summary     # inspect only
  python convert/router.py --export-torch ckpt/ddim20_router.safetensors --out DDIM20_router.pt
  python convert/router.py --checkpoint DDIM50_router.pt --steps 20 --out ckpt/ddim20_from50.safetensors

Kinds: dit-ddim (DiT + DDIM, released DDIM*_router.pt) and uvit-dpm2 (U-ViT +
DPM-Solver-2, released dpm*_router.pth); detected from the file when omitted.
--summary prints `cache steps compute C/T sub-layers (P% removed)` at the
threshold (--threshold, or the one stored in a project file).
--steps M retargets the router to M steps (DDIM steps, or U-ViT NFE): each
sub-layer's logit interpolated over the diffusion time of the steps
(`l2c_jax.retarget`), no training and no data.
"""

from __future__ import annotations

import argparse

from l2c_jax.cli import run_main
from l2c_jax.errors import ConfigError


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="router to convert: released .pt/.pth, or a project .safetensors / directory")
    src.add_argument("--export-torch", metavar="FILE", help="router to write back in the released PyTorch format")
    p.add_argument("--kind", choices=("dit-ddim", "uvit-dpm2"), help="router kind (default: from the file)")
    p.add_argument("--out", help="output: .safetensors file or directory (--checkpoint), .pt/.pth (--export-torch)")
    p.add_argument("--threshold", type=float, help="default threshold stored with the router; used by --summary")
    p.add_argument("--summary", action="store_true", help="print the compute count of the cache steps")
    p.add_argument("--steps", type=int, help="retarget to this many steps (DDIM steps / U-ViT NFE) by interpolation")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from l2c_jax.convert.router import convert_router, export_router

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold}: must lie in [0, 1] (it is compared with sigmoid(prob))")
    if args.export_torch:
        if args.steps is not None:
            raise ConfigError("--steps retargets a router into the project format: use it with --checkpoint")
        if not args.out:
            raise ConfigError("--export-torch needs --out FILE.pt")
        router = export_router(args.export_torch, args.out, kind=args.kind, overwrite=args.overwrite)
        if args.threshold is not None:
            router.threshold = args.threshold
    else:
        if not args.out and not args.summary:
            raise ConfigError("nothing to do: pass --out FILE and/or --summary")
        router = convert_router(args.checkpoint, args.out, kind=args.kind, threshold=args.threshold,
                                steps=args.steps, overwrite=args.overwrite)
    if args.out:
        print(f"wrote {args.out}: {router.describe()}")
    if args.summary:
        print(router.summary())


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
