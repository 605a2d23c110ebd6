"""Evaluate samples as the ADM evaluator does: Inception Score, FID, sFID, precision and recall.

  python scripts/evaluate.py --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
      --inception ckpt/inception_fid

Both npz files hold `arr_0`, uint8 images (N, H, W, 3) (`l2c-sample` writes
such a file; the reference batches are openai/guided-diffusion's). The
Inception network is pytorch-fid's FID Inception-v3, converted once with
`python convert/inception.py --checkpoint pt_inception-2015-12-05-6726825d.pth --out ckpt/inception_fid`.
Reference features are cached beside the reference as `<name>.l2c_stats.npz`.
Prints the five numbers in the evaluator's format, one per line.
"""

from __future__ import annotations

import argparse

from l2c_jax.cli import run_main

ORDER = ("Inception Score", "FID", "sFID", "Precision", "Recall")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="npz with arr_0: uint8 (N, H, W, 3) samples")
    p.add_argument("--reference", required=True, help="reference batch npz (arr_0, optionally mu/sigma/mu_s/sigma_s)")
    p.add_argument("--inception", required=True, help="converted FID Inception-v3 directory")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from l2c_jax.errors import ConfigError
    from l2c_jax.eval.evaluator import evaluate

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    metrics = evaluate(args.samples, args.reference, args.inception, batch_size=args.batch_size)
    for name in ORDER:
        print(f"{name}: {metrics[name]}")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
