"""Evaluate samples with the ADM evaluator's metrics (Inception Score, FID, sFID, precision, recall).

`python scripts/evaluate.py --help` for the usage.
"""

from l2c_jax.commands.evaluate import run

if __name__ == "__main__":
    run()
