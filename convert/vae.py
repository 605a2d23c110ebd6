"""Convert a KL autoencoder checkpoint (Stable Diffusion's KL-f8) into an l2c_jax VAE directory.

The same as the console command `l2c-convert-vae`; `l2c-convert-vae --help` for the usage.
"""

from l2c_jax.commands.convert_vae import run

if __name__ == "__main__":
    run()
