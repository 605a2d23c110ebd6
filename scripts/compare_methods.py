"""Every caching method on one harness (L2C against the training-free methods).

The same as the console command `l2c-compare-methods`; `l2c-compare-methods --help` for the usage.
"""

from l2c_jax.commands.compare_methods import run

if __name__ == "__main__":
    run()
