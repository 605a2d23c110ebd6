"""Files that ship inside the package: the configs and the shipped digits model.

Both live under `l2c_jax/` so `pip install .` carries them; the checkout's
top-level `configs/` and `assets/` are links to them, so the README's paths
work from a checkout and the same names resolve anywhere else.
"""

from __future__ import annotations

import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")
ASSETS_DIR = os.path.join(PACKAGE_DIR, "assets")


def asset(*parts: str) -> str:
    """Absolute path of a shipped asset, e.g. `asset("digits", "dit")`."""
    return os.path.join(ASSETS_DIR, *parts)


def config_file(path: str) -> str:
    """A config path as given, or the shipped config of that name when it names no file here.

    `configs/digits.py` and `digits.py` both find the installed package's
    `l2c_jax/configs/digits.py` when run outside a checkout.
    """
    if os.path.isfile(path):
        return path
    name = os.path.normpath(path)
    if name.startswith("configs" + os.sep):
        name = name[len("configs" + os.sep):]
    shipped = os.path.join(CONFIGS_DIR, name)
    return shipped if os.path.isfile(shipped) and os.sep not in name else path
