"""Format versions of the files this project writes, and the one rule every loader applies.

Two formats carry a version:

Model directory (`l2c_jax.checkpoint`: `write_model_dir` / `read_model_meta`,
behind `Model.save` / `load_model`, `VAE.save` / `load_vae` and convert/):
`DIR/config.json` holds `"format_version"` as a JSON integer.

  version 1  `DIR/config.json` = {"family", "config", "format_version": 1,
             extra keys such as "source"}; `DIR/params/0/` an orbax
             checkpoint (step 0) of the params tree. Written by every
             release so far (the field has been recorded since the first
             commit).

Router (`l2c_jax.router`: `save_router` / `load_router`): a `.safetensors`
file, or a directory holding `router.safetensors`, whose string metadata
holds `"format": "l2c_jax.router"` and `"format_version"` as a decimal string.

  version 1  tensor `prob` (rows, units) float32; metadata "format",
             "format_version" "1", "kind" (dit-ddim | uvit-dpm2), "steps",
             "num_units", "threshold" ("" for none), "source". Written by
             every release so far (recorded since the first commit).
  version 2  adds, for a router trained with learned forecasts, the tensor
             `forecast_coefs` (rows, units, 2) float32. Version 1 files
             load as they are (routers without learned forecasts).
  version 3  adds the metadata "anchors": "" for a router whose full steps
             are every period-th, else its full steps (sampler steps in
             sampling order, comma-separated; `l2c_jax.schedule.anchor_layout`).
             Versions 1 and 2 load as they are (periodic routers).

The rule (`check_format_version`): the current version loads; an older one
loads when it is at least the format's OLDEST (its loader then upgrades it
in memory) and is otherwise refused with the command that rewrites it; a
newer one is refused ("upgrade l2c_jax"); a missing, non-integer or
non-positive version is refused. Every refusal is a one-line
`CheckpointError`. No file of this project has ever been written without a
version, so a missing one means the file was not written by l2c_jax (or was
damaged), not "version 1".

Changing a format: bump its *_VERSION, add a line above saying what
changed, and either give the loader an in-memory upgrade from the old
version (leaving *_OLDEST where it is) or raise *_OLDEST so old files are
refused with the converter hint.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from l2c_jax.errors import CheckpointError

MODEL_DIR_VERSION = 1  # written by write_model_dir
MODEL_DIR_OLDEST = 1   # oldest read (upgraded in memory when older than the current one)
ROUTER_VERSION = 3     # written by save_router
ROUTER_OLDEST = 1

FIELD = "format_version"

_DIGITS = re.compile(r"[0-9]+")


def _shown(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def parse_version(found: Any) -> Optional[int]:
    """A positive int (or its decimal string, as safetensors metadata stores it) -> int; anything else None."""
    if isinstance(found, bool):
        return None
    if isinstance(found, int):
        return found if found >= 1 else None
    if isinstance(found, str) and _DIGITS.fullmatch(found):
        v = int(found)
        return v if v >= 1 else None
    return None


def check_format_version(found: Any, current: int, what: str, path: str, migrate_hint: str,
                         oldest: Optional[int] = None, missing: bool = False) -> int:
    """The version of a file this code can read, or a one-line CheckpointError.

    found: the recorded value (None when `missing`); current: the version this
    code writes; what: the format's name for messages ("model directory",
    "router"); path: the file, for messages; migrate_hint: how to rewrite an
    old or unreadable file in the current format (a command line); oldest:
    the oldest version still read (default `current`), which the caller
    upgrades in memory.
    """
    oldest = current if oldest is None else oldest
    if missing:
        raise CheckpointError(f"{path}: no {FIELD} recorded, which every l2c_jax {what} has: not written by "
                              f"l2c_jax or damaged; {migrate_hint}")
    version = parse_version(found)
    if version is None:
        raise CheckpointError(f"{path}: {what} {FIELD} {_shown(found)} is not a positive integer (damaged or "
                              f"not written by l2c_jax); {migrate_hint}")
    if version > current:
        raise CheckpointError(f"{path}: written by a newer l2c_jax ({what} format {version}, this reads up to "
                              f"{current}): upgrade l2c_jax")
    if version < oldest:
        readable = str(current) if oldest == current else f"{oldest} to {current}"
        raise CheckpointError(f"{path}: {what} format {version} is too old (this l2c_jax reads format "
                              f"{readable}); {migrate_hint}")
    return version
