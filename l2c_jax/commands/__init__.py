"""The command-line entry points, one module per command (`scripts/` and `convert/` call them).

Each module parses its flags, calls one job of the library and reports to the
terminal; they are the only modules of the package that print. Installed with
pip, each is a console command (pyproject.toml): l2c-sample, l2c-train-router,
l2c-train-dit, l2c-benchmark, l2c-extract-latents, l2c-evaluate, and
l2c-convert-{dit,uvit,vae,router,inception} (also `l2c-convert KIND ...`).
"""

from __future__ import annotations

