"""Convert a Learning-to-Cache router between the released PyTorch files and the project format.

The same as the console command `l2c-convert-router`; `l2c-convert-router --help` for the usage.
"""

from l2c_jax.commands.convert_router import run

if __name__ == "__main__":
    run()
