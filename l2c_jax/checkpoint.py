"""Saving and restoring parameter trees with orbax, plus the model directory layout.

A converted model directory holds:
  DIR/config.json   {"family": ..., "config": {...}, "format_version": N, ...}: what to build
  DIR/params/0/     an orbax checkpoint (CheckpointManager, step 0) of the params tree

`read_model_meta` checks the format version before anything else (versions
and the rule: `l2c_jax.formats`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax import formats, parallel
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.memory import release_free_heap, weights_restored

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = formats.MODEL_DIR_VERSION
CHECKSUMS = "checksums"  # {file under params/: crc32}, written at conversion, checked on load
CONFIG_CHECKSUM = "config_checksum"  # of "config": a hand-edited head count loaded and sampled garbage
_RESERVED = ("family", "config", formats.FIELD, CHECKSUMS, CONFIG_CHECKSUM)
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
    `abstract` the tree is restored as saved and then placed. Any failure of
    orbax or TensorStore (a data file deleted or truncated) becomes one line
    naming the directory.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no parameter checkpoint")
    _quiet_abandoned_reads()  # before: orbax's read thread may drop them before the error reaches us
    if abstract is not None:
        weights_restored(tree_bytes(abstract))  # before the read: its buffers would stay in the heap
    try:
        with _manager(directory) as mngr:
            step = mngr.latest_step()
            if step is None:
                raise CheckpointError(f"{directory}: no complete checkpoint step found")
            if abstract is None:
                params = parallel.place(mngr.restore(step, args=ocp.args.StandardRestore()), mesh)
            else:
                params = mngr.restore(step, args=ocp.args.StandardRestore(parallel.abstract_on(abstract, mesh)))
    except CheckpointError:
        raise
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: checkpoint does not match the configured model: {_one_line(e)}") \
            from None
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types; the user needs one line
        gc.collect()  # the abandoned reads go now, through the hook, not at shutdown
        raise CheckpointError(f"{directory}: unreadable checkpoint ({type(e).__name__}: {_one_line(e)}); "
                              "convert the original weights again") from None
    # TensorStore's read buffers are freed by now but stay in the C heap: 0.5 GiB resident after a
    # DiT-XL/2 + VAE load, under everything sampling allocates next (docs/performance.md).
    gc.collect()
    release_free_heap()
    if abstract is None:  # sizes known only now
        weights_restored(tree_bytes(params))
    return params


def tree_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype"))


def _quiet_abandoned_reads() -> None:
    """Drops the tracebacks of orbax's sibling reads abandoned by a failed restore (installed once).

    Python reports an abandoned coroutine through `sys.unraisablehook` and an abandoned task through the
    "asyncio" logger; both are filtered for orbax's reads only, as are TensorStore's late callbacks into
    orbax's closed event loop (`_closed_loop_callback`).

    When one array of a damaged checkpoint fails, orbax's other read coroutines
    fail too and are never awaited; Python prints each as "Exception ignored
    in <coroutine ...>" (a screenful of TensorStore specs) when it collects
    them, burying the one-line error. Only those coroutines are dropped.
    """
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_l2c_quiet", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and "orbax" in code.co_filename:
            return
        if _closed_loop_callback(unraisable):
            return
        previous(unraisable)

    hook._l2c_quiet = True
    sys.unraisablehook = hook
    # The same reads, when their asyncio task is collected first, are logged instead ("Task exception was
    # never retrieved", logger "asyncio", the task's orbax coroutine in the message).
    logging.getLogger("asyncio").addFilter(_drop_orbax_task_reports)


def _closed_loop_callback(unraisable) -> bool:
    """TensorStore finishing an abandoned read after orbax closed its event loop: the callback's
    `call_soon_threadsafe` raises "Event loop is closed", reported with no object."""
    if unraisable.object is not None or not isinstance(unraisable.exc_value, RuntimeError):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _drop_orbax_task_reports(record) -> bool:
    msg = str(record.msg)
    return not ("Task exception was never retrieved" in msg and "orbax" in msg)


def _one_line(e: BaseException, n: int = 240) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= n else msg[:n] + "..."


# ---------------------------------------------------------------------------
# Integrity: a checksum per file, the config's own, finite weights
# ---------------------------------------------------------------------------

def file_checksums(directory: str) -> dict:
    """{path relative to `directory`: "crc32:XXXXXXXX"} of every file below it (CRC-32: ~1 GB/s here, and
    it finds the flipped bytes a damaged copy has; it is no defence against a deliberate edit)."""
    import zlib

    out = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            crc = 0
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    crc = zlib.crc32(chunk, crc)
            out[os.path.relpath(path, directory)] = f"crc32:{crc:08x}"
    return dict(sorted(out.items()))


def config_checksum(config: dict) -> str:
    import zlib

    return f"crc32:{zlib.crc32(json.dumps(config, sort_keys=True).encode()):08x}"


def verify_model_dir(directory: str, meta: dict) -> None:
    """Checks the parameter files against the checksums written at conversion (directories written before
    checksums existed pass unchecked)."""
    recorded = meta.get(CHECKSUMS)
    if not isinstance(recorded, dict):
        return
    params_dir = os.path.join(directory, PARAMS_DIR)
    found = file_checksums(params_dir) if os.path.isdir(params_dir) else {}
    for rel, crc in recorded.items():
        if rel not in found:
            raise CheckpointError(f"{os.path.join(params_dir, rel)}: missing; the model directory is incomplete "
                                  "(copy it again or convert again)")
        if found[rel] != crc:
            raise CheckpointError(f"{os.path.join(params_dir, rel)}: damaged (checksum {found[rel]}, written as "
                                  f"{crc}); copy the model directory again or convert again")


def check_finite(params: Any, where: str) -> None:
    """Refuses parameters holding NaN or inf, naming the first such leaf (checked on the devices)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    floats = [(p, v) for p, v in leaves if jnp.issubdtype(v.dtype, jnp.floating)]
    if not floats:
        return
    ok = jax.device_get(jax.jit(lambda vs: jnp.stack([jnp.all(jnp.isfinite(v)) for v in vs]))(
        [v for _, v in floats]))
    bad = [jax.tree_util.keystr(p) for (p, _), good in zip(floats, ok) if not good]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} parameter array{'s hold' if len(bad) > 1 else ' holds'} NaN or "
                              f"inf values (first: {bad[0]}); the weights are damaged")


def load_model_params(directory: str, meta: dict, abstract: Any, mesh=None) -> Any:
    """A model directory's parameters on the devices: files checked against their checksums, shapes
    against `abstract`, values finite; every failure one line naming the directory."""
    verify_model_dir(directory, meta)
    params = restore_params(os.path.join(directory, PARAMS_DIR), abstract, mesh=mesh)
    check_finite(params, directory)
    return params


def write_model_dir(directory: str, family: str, config: dict, params: Any, overwrite: bool = False,
                    **extra) -> None:
    """Writes DIR/params and DIR/config.json; anything at DIR is refused unless `overwrite`.

    The directory is written under DIR.partial and renamed into place when whole, so a failed or killed
    write leaves what was there. config.json records a checksum of every parameter file and of the
    config itself, checked on load. `extra` keys (e.g. source=) are stored beside family, config and
    format_version, which they may not replace.
    """
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ConfigError(f"write_model_dir: {', '.join(clash)} cannot be passed as extra metadata")
    from l2c_jax import distributed, outputs

    directory = os.path.abspath(directory)
    outputs.check_output(directory, overwrite=overwrite, flag="output",
                         hint="remove it, pass --overwrite (Model.save(..., overwrite=True))")
    distributed.barrier("l2c-model-dir-checked")  # every process saw the old model before anything moves
    tmp = directory + outputs.PARTIAL
    if distributed.is_main():
        tmp = outputs.staging_path(directory)
        os.makedirs(tmp)
    distributed.barrier("l2c-model-dir-ready")
    save_params(os.path.join(tmp, PARAMS_DIR), params)  # several processes: orbax's multi-host save, all take part
    distributed.barrier("l2c-model-dir-saved")
    if distributed.is_main():
        meta = {**extra, "family": family, "config": config, formats.FIELD: FORMAT_VERSION,
                CHECKSUMS: file_checksums(os.path.join(tmp, PARAMS_DIR)), CONFIG_CHECKSUM: config_checksum(config)}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        outputs.publish(tmp, directory)
    distributed.barrier("l2c-model-dir-written")


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
    if CONFIG_CHECKSUM in meta and meta[CONFIG_CHECKSUM] != config_checksum(meta["config"]):
        raise CheckpointError(f"{path}: its \"config\" was edited after conversion (checksum differs); the weights "
                              "were converted for the original config: convert again instead of editing it")
    return meta


def _migrate_hint(family) -> str:
    script = _CONVERTERS.get(family) if isinstance(family, str) else None
    script = script or "convert/{dit,uvit,vae}.py"
    return f"convert the original weights again: python {script} --checkpoint ORIGINAL --out NEW_DIR"
