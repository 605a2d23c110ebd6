"""Convert a PyTorch U-ViT checkpoint into an l2c_jax model directory.

The same as the console command `l2c-convert-uvit`; `l2c-convert-uvit --help` for the usage.
"""

from l2c_jax.commands.convert_uvit import run

if __name__ == "__main__":
    run()
