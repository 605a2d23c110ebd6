"""Convert a DiT checkpoint (the original's, or diffusers' DiTTransformer2DModel) into an l2c_jax model directory.

  python convert/dit.py --checkpoint DiT-XL-2-256x256.pt --model DiT-XL/2 --out ckpt/dit_xl2_256
  python convert/dit.py --checkpoint DiT-XL-2-256/transformer --out ckpt/dit_xl2_256_diffusers
  python convert/dit.py --checkpoint DiT-XL-2-256 --timestep-shift original --out ckpt/dit_xl2_256   # pipeline
  python convert/dit.py --export-diffusers ckpt/dit_xl2_256 --out DiT-XL-2-256-transformer

A diffusers checkpoint is a transformer folder (config.json + weights), a
pipeline folder (model_index.json; its vae/ is converted into OUT/vae and its
scheduler checked against DiT's linear 1000-step schedule), or the weights file
with its config.json beside it. --timestep-shift: "diffusers" (default for
diffusers checkpoints) reproduces diffusers' outputs; "original" runs the
original DiT's timestep embedding and MLP LayerNorm, as the released routers
were trained.
"""

from __future__ import annotations

import argparse
import os

from l2c_jax.cli import run_main
from l2c_jax.errors import ConfigError


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="original state dict or training checkpoint (.pt/.pth/.bin/.safetensors), "
                                          "or a diffusers transformer / pipeline folder")
    src.add_argument("--export-diffusers", metavar="MODEL_DIR", help="a converted DiT to write in diffusers' format")
    p.add_argument("--model", help="released architecture name, e.g. DiT-XL/2 (gives the head count)")
    p.add_argument("--num-heads", type=int, help="head count for other sizes")
    p.add_argument("--num-classes", type=int, help="classes, when the label table has no null row")
    p.add_argument("--timestep-shift", choices=("diffusers", "original"),
                   help="numerics of a diffusers checkpoint (default diffusers)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (refused otherwise)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    from l2c_jax import outputs
    from l2c_jax.convert import diffusers_dit
    from l2c_jax.convert.dit import convert_dit, export_diffusers

    # Before any work: an --out that is the input (a diffusers folder converted in place) or that holds
    # anything is refused, the latter unless --overwrite.
    outputs.check_output(args.out, overwrite=args.overwrite, inputs=[args.checkpoint, args.export_diffusers])
    if args.export_diffusers:
        from l2c_jax.model import load_model

        model = load_model(args.export_diffusers)
        if model.family != "dit":
            raise ConfigError(f"{args.export_diffusers}: a {model.family} model; only DiT exports to diffusers")
        note = export_diffusers(model, args.out)
        print(f"wrote {args.out}: {diffusers_dit.CLASS_NAME}" + (f" ({note})" if note else ""))
        return

    found = diffusers_dit.locate(args.checkpoint) if os.path.exists(args.checkpoint) else None
    pipeline = found and found["pipeline"]
    if pipeline:  # refuse a pipeline trained for another schedule before converting anything
        diffusers_dit.check_scheduler(pipeline)
    model = convert_dit(args.checkpoint, args.model, args.num_heads, args.num_classes, args.timestep_shift)
    model.save(args.out, overwrite=args.overwrite, source=os.path.basename(os.path.normpath(args.checkpoint)),
               name=args.model)
    c = model.config
    numerics = ", diffusers' numerics" if c.freq_shift else (", the original's numerics" if found else "")
    print(f"wrote {args.out}: DiT depth {c.depth}, width {c.hidden_size}, patch {c.patch_size}, "
          f"{c.num_heads} heads, latent {c.input_size}x{c.input_size}x{c.in_channels}, {c.num_classes} classes"
          + numerics)
    vae_dir = os.path.join(pipeline, "vae") if pipeline else None
    if vae_dir and os.path.isdir(vae_dir):
        from l2c_jax.convert.vae import convert_vae

        weights = [os.path.join(vae_dir, w) for w in diffusers_dit.WEIGHTS if os.path.isfile(os.path.join(vae_dir, w))]
        if not weights:
            raise ConfigError(f"{vae_dir}: no {' or '.join(diffusers_dit.WEIGHTS)}")
        vae, naming, _ = convert_vae(weights[0])
        out_vae = os.path.join(args.out, "vae")
        vae.save(out_vae, source=os.path.basename(os.path.normpath(pipeline)) + "/vae", naming=naming)
        print(f"wrote {out_vae}: the pipeline's autoencoder ({naming} naming); sample with --config.vae.checkpoint={out_vae}")


def run(argv=None):
    """Console entry point."""
    run_main(main, argv)


if __name__ == "__main__":
    run()
