"""Encode a dataset once with the VAE, for router training on precomputed latents.

The same as the console command `l2c-extract-latents`; `l2c-extract-latents --help` for the usage.
"""

from l2c_jax.commands.extract_latents import run

if __name__ == "__main__":
    run()
