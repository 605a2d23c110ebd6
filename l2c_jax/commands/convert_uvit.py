"""Convert a PyTorch U-ViT checkpoint into an l2c_jax model directory.

  python convert/uvit.py --checkpoint imagenet256_uvit_huge.pth --model U-ViT-H/2 --out ckpt/uvit_h2_256

Image size, patch, channels, width, depth, classes, qkv bias, MLP time
embedding and the final conv are read off the weights; the head count comes
from --model (a released architecture) or --num-heads.
"""

from __future__ import annotations

import argparse
import os

from l2c_jax.cli import run_main


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="state dict (.pt/.pth/.bin/.safetensors), e.g. nnet_ema.pth")
    p.add_argument("--model", help="released architecture name, e.g. U-ViT-H/2 (gives the head count)")
    p.add_argument("--num-heads", type=int, help="head count for other sizes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    from l2c_jax import outputs

    outputs.check_output(args.out, overwrite=args.overwrite, inputs=[args.checkpoint])  # before any work

    from l2c_jax.convert.uvit import convert_uvit

    model = convert_uvit(args.checkpoint, args.model, args.num_heads)
    model.save(args.out, overwrite=args.overwrite, source=os.path.basename(args.checkpoint), name=args.model)
    c = model.config
    classes = f"{c.num_classes} label rows" if c.num_classes > 0 else "unconditional"
    print(f"wrote {args.out}: U-ViT depth {c.depth} ({c.num_blocks} blocks, {c.num_units} cacheable sub-layers), "
          f"width {c.embed_dim}, patch {c.patch_size}, {c.num_heads} heads, "
          f"input {c.img_size}x{c.img_size}x{c.in_chans}, {classes}")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
