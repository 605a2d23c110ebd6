"""Router files: released PyTorch routers <-> the project's safetensors format.

The logic behind `convert/router.py`; see `l2c_jax.router` for the formats.
"""

from __future__ import annotations

import os
from typing import Optional

from l2c_jax import outputs
from l2c_jax.errors import ConfigError
from l2c_jax.retarget import retarget
from l2c_jax.router import Router, export_torch, load_router, save_router
from l2c_jax.torch_io import TORCH_SUFFIXES


def convert_router(src: str, out: Optional[str], kind: Optional[str] = None,
                   threshold: Optional[float] = None, steps: Optional[int] = None,
                   overwrite: bool = False) -> Router:
    """Reads any router file; writes the project format to `out` when given (an existing `out` is refused
    unless `overwrite`; `out` may never be `src`).

    `threshold` is stored as the router's default threshold, so that later
    `router.masks()` / `summary()` calls need none. `steps`: retargeted to that
    many steps first (`l2c_jax.retarget`).
    """
    if out is not None and os.fspath(out).endswith(TORCH_SUFFIXES):
        raise ConfigError(f"--out {out}: the project format is a .safetensors file or a directory; "
                          "use --export-torch to write a PyTorch file")
    if out is not None:
        outputs.check_output(out, overwrite=overwrite, inputs=[src])
    router = load_router(src, kind=kind, threshold=threshold)
    if steps is not None:
        router = retarget(router, steps)
    if out is not None:
        save_router(router, out)
    return router


def export_router(src: str, out: str, kind: Optional[str] = None, overwrite: bool = False) -> Router:
    """Reads any router file and writes the released PyTorch layout of its kind to `out`."""
    if os.fspath(out).endswith(".safetensors"):
        raise ConfigError(f"--out {out}: --export-torch writes a PyTorch file (.pt / .pth), not safetensors")
    outputs.check_output(out, overwrite=overwrite, inputs=[src])
    router = load_router(src, kind=kind)
    export_torch(router, out)
    return router
