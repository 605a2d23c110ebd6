"""Train a Learning-to-Cache router for a frozen diffusion model.

The same as the console command `l2c-train-router`; `l2c-train-router --help` for the usage.
"""

from l2c_jax.commands.train_router import run

if __name__ == "__main__":
    run()
