"""Saving and restoring parameter trees with orbax, plus the model directory layout.

A converted model directory holds:
  DIR/config.json   {"family": ..., "config": {...}, "format_version": N, ...}: what to build
  DIR/params/0/     an orbax checkpoint (CheckpointManager, step 0) of the params tree

`read_model_meta` checks the format version before anything else (versions
and the rule: `l2c_jax.formats`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from l2c_jax import formats, parallel
from l2c_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = formats.MODEL_DIR_VERSION
_RESERVED = ("family", "config", formats.FIELD)
# The command that rewrites a model directory of each family in the current format.
_CONVERTERS = {"dit": "convert/dit.py", "uvit": "convert/uvit.py", "vae": "convert/vae.py",
               "inception_fid": "convert/inception.py"}


# Bytes orbax keeps in flight while saving or restoring. Its default (96 GB)
# lets a whole DiT-XL/2 be staged at once: saving 2.7 GB of weights then peaks
# at 2x their size on top of the tree itself. 1 GB keeps the transient small at
# no measurable cost in time.
CONCURRENT_GB = 1


def _manager(directory: str, create: bool = False, save: bool = False):
    import orbax.checkpoint as ocp

    if save:  # the PyTree handler (StandardSave's own format) also bounds device-to-host copies
        handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=CONCURRENT_GB,
                                              save_device_host_concurrent_gb=CONCURRENT_GB)
    else:
        handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=CONCURRENT_GB)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=create),
                                 item_handlers=handler)


def save_params(directory: str, params: Any, step: int = 0) -> None:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    # orbax stages NumPy leaves through extra host copies (peak ~3x the tree at
    # DiT-XL/2 size); device arrays it writes with little overhead, and on the
    # CPU placing a NumPy array aliases it instead of copying.
    params = parallel.place(params)
    with _manager(directory, create=True, save=True) as mngr:
        mngr.save(step, args=ocp.args.PyTreeSave(params), force=True)
        mngr.wait_until_finished()


def restore_params(directory: str, abstract: Any = None, mesh=None) -> Any:
    """Restores the latest step straight onto the devices.

    With `abstract` (ShapeDtypeStructs) shapes are checked and every leaf is
    restored as a device array replicated over `mesh` (default: all devices):
    orbax returns host NumPy arrays for a target without a sharding, and a
    jitted call would copy those to the device again on every call. Without
    `abstract` the tree is restored as saved and then placed.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no parameter checkpoint")
    with _manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise CheckpointError(f"{directory}: no complete checkpoint step found")
        try:
            if abstract is None:
                return parallel.place(mngr.restore(step, args=ocp.args.StandardRestore()), mesh)
            return mngr.restore(step, args=ocp.args.StandardRestore(parallel.abstract_on(abstract, mesh)))
        except (ValueError, KeyError, FileNotFoundError) as e:
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"{directory}: checkpoint does not match the configured model: {msg}") from None


def write_model_dir(directory: str, family: str, config: dict, params: Any, overwrite: bool = False,
                    **extra) -> None:
    """Writes DIR/params and DIR/config.json; an existing model there is refused unless `overwrite`.

    `extra` keys (e.g. source=) are stored beside family, config and format_version, which they may not replace.
    """
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ConfigError(f"write_model_dir: {', '.join(clash)} cannot be passed as extra metadata")
    from l2c_jax import distributed

    params_dir = os.path.join(directory, PARAMS_DIR)
    if os.path.isdir(params_dir) and os.listdir(params_dir):
        if not overwrite:
            raise CheckpointError(f"{directory}: already holds a model; remove it or choose another output "
                                  "directory (nothing was written)")
        distributed.barrier("l2c-model-dir-checked")  # every process saw the old model before it goes
        if distributed.is_main():
            import shutil
            shutil.rmtree(params_dir)
    if distributed.is_main():
        os.makedirs(directory, exist_ok=True)
    distributed.barrier("l2c-model-dir-ready")
    save_params(params_dir, params)  # with several processes, orbax's multi-host save: all of them take part
    if distributed.is_main():
        meta = {**extra, "family": family, "config": config, formats.FIELD: FORMAT_VERSION}
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    formats.check_format_version(meta.get(formats.FIELD), FORMAT_VERSION, "model directory", path,
                                 _migrate_hint(meta.get("family")), oldest=formats.MODEL_DIR_OLDEST,
                                 missing=formats.FIELD not in meta)
    # Format 1 is the only one so far: nothing to upgrade in memory.
    if "family" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: missing 'family' or 'config'")
    return meta


def _migrate_hint(family) -> str:
    script = _CONVERTERS.get(family) if isinstance(family, str) else None
    script = script or "convert/{dit,uvit,vae}.py"
    return f"convert the original weights again: python {script} --checkpoint ORIGINAL --out NEW_DIR"
