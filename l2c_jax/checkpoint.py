"""Saving and restoring parameter trees with orbax, plus the model directory layout.

A converted model directory holds:
  DIR/config.json   {"family": ..., "config": {...}, ...}: what to build
  DIR/params/0/     an orbax checkpoint (CheckpointManager, step 0) of the params tree
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from l2c_jax.errors import CheckpointError

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_params(directory: str, params: Any, step: int = 0) -> None:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(step, args=ocp.args.StandardSave(params), force=True)
        mngr.wait_until_finished()


def restore_params(directory: str, abstract: Any = None) -> Any:
    """Restores the latest step; with `abstract` (ShapeDtypeStructs) shapes are checked."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no parameter checkpoint")
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint step found")
        try:
            if abstract is None:
                return mngr.restore(step, args=ocp.args.StandardRestore())
            return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, FileNotFoundError) as e:
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{directory}: checkpoint does not match the configured model: {msg}") from None


def write_model_dir(directory: str, family: str, config: dict, params: Any, **extra) -> None:
    os.makedirs(directory, exist_ok=True)
    save_params(os.path.join(directory, PARAMS_DIR), params)
    meta = {"family": family, "config": config, "format_version": 1, **extra}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_model_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such model directory (convert a checkpoint first)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a directory written by convert/") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "family" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: missing 'family' or 'config'")
    return meta


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
