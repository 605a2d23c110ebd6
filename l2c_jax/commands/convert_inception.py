"""Convert pytorch-fid's FID Inception-v3 weights into an l2c_jax Inception directory.

  python convert/inception.py --checkpoint pt_inception-2015-12-05-6726825d.pth --out ckpt/inception_fid

The directory is read by `l2c_jax.eval.inception.load_inception` (FID, sFID,
Inception Score and precision/recall features of the ADM evaluator).
"""

from __future__ import annotations

import argparse
import os

from l2c_jax.cli import run_main


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="state dict of pytorch_fid.inception.fid_inception_v3() (.pth or .safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    from l2c_jax import outputs

    outputs.check_output(args.out, overwrite=args.overwrite, inputs=[args.checkpoint])  # before any work

    from l2c_jax.convert.inception import convert_inception, save_inception
    from l2c_jax.models.inception import param_count

    params = convert_inception(args.checkpoint)
    save_inception(args.out, params, overwrite=args.overwrite, source=os.path.basename(args.checkpoint))
    print(f"wrote {args.out}: FID Inception-v3 (pytorch-fid), {param_count(params) / 1e6:.1f}M parameters, "
          f"features pool 2048 / spatial 2023 / logits 1008")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
