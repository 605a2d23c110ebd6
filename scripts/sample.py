"""Sample images with a DiT or U-ViT, with or without the learned cache.

The same as the console command `l2c-sample`; `l2c-sample --help` for the usage.
"""

from l2c_jax.commands.sample import run

if __name__ == "__main__":
    run()
