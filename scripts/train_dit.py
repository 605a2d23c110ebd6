"""Train a class-conditional DiT from scratch (DiT's objective, EMA, label dropout).

The same as the console command `l2c-train-dit`; `l2c-train-dit --help` for the usage.
"""

from l2c_jax.commands.train_dit import run

if __name__ == "__main__":
    run()
