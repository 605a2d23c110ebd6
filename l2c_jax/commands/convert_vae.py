"""Convert a KL autoencoder checkpoint (Stable Diffusion's KL-f8) into an l2c_jax VAE directory.

  python convert/vae.py --checkpoint diffusion_pytorch_model.safetensors --out ckpt/sd_vae_ft_ema
  python convert/vae.py --checkpoint autoencoder_kl_ema.pth --out ckpt/uvit_autoencoder

The naming (diffusers or LDM) is detected from the keys, the architecture read
off the weights.
"""

from __future__ import annotations

import argparse
import os
import sys

from l2c_jax.cli import run_main


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="diffusers (.safetensors/.bin) or LDM (.pth/.ckpt) autoencoder weights")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    from l2c_jax import outputs

    outputs.check_output(args.out, overwrite=args.overwrite, inputs=[args.checkpoint])  # before any work

    from l2c_jax.convert.vae import convert_vae

    vae, naming, notes = convert_vae(args.checkpoint)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    vae.save(args.out, overwrite=args.overwrite, source=os.path.basename(args.checkpoint), naming=naming)
    c = vae.config
    attn = ""
    if c.encoder_attn_levels or c.decoder_attn_levels:
        attn = f", attention at levels {list(c.encoder_attn_levels)}/{list(c.decoder_attn_levels)}"
    print(f"wrote {args.out}: KL autoencoder ({naming} naming), ch {c.ch} x {list(c.ch_mult)}, "
          f"{c.num_res_blocks} res-block{'s' if c.num_res_blocks != 1 else ''} per level{attn}, z {c.z_channels}, embed {c.embed_dim}, "
          f"{c.in_channels}->{c.out_channels} channels, downsampling {c.downsample_factor}x")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
