"""Convert a PyTorch DiT checkpoint into an l2c_jax model directory.

  python convert/dit.py --checkpoint DiT-XL-2-256x256.pt --model DiT-XL/2 --out ckpt/dit_xl2_256
"""

from __future__ import annotations

import argparse
import os

from l2c_jax.cli import run_main


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="plain state dict or training checkpoint (.pt/.pth/.bin/.safetensors)")
    p.add_argument("--model", help="released architecture name, e.g. DiT-XL/2 (gives the head count)")
    p.add_argument("--num-heads", type=int, help="head count for other sizes")
    p.add_argument("--num-classes", type=int, help="classes, when the label table has no null row")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from l2c_jax.convert.dit import convert_dit

    model = convert_dit(args.checkpoint, args.model, args.num_heads, args.num_classes)
    model.save(args.out, source=os.path.basename(args.checkpoint), name=args.model)
    c = model.config
    print(f"wrote {args.out}: DiT depth {c.depth}, width {c.hidden_size}, patch {c.patch_size}, "
          f"{c.num_heads} heads, latent {c.input_size}x{c.input_size}x{c.in_channels}, {c.num_classes} classes")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
