"""Convert a PyTorch DiT checkpoint into an l2c_jax model directory.

The same as the console command `l2c-convert-dit`; `l2c-convert-dit --help` for the usage.
"""

from l2c_jax.commands.convert_dit import run

if __name__ == "__main__":
    run()
