"""Reading PyTorch checkpoints safely.

Checkpoints come from strangers, so nothing here unpickles arbitrary objects:
`torch.load(weights_only=True)` only rebuilds tensors and plain containers,
and the one extra class the released training checkpoints need,
`argparse.Namespace`, is allow-listed explicitly. Safetensors files hold
tensors only. Everything returned is NumPy (float32 unless the file says
otherwise), so nothing downstream depends on torch.
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from l2c_jax.errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def require_torch():
    """PyTorch, needed only to read PyTorch files (the `converters` extra)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading PyTorch files (.pt/.pth/.bin/.ckpt) needs torch: "
                              "pip install 'l2c_jax[converters]' (or convert to .safetensors elsewhere)") from None
    return torch


def _to_numpy(obj: Any) -> Any:
    """Tensors -> NumPy arrays, recursively through containers."""
    torch = require_torch()

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen losslessly.
            t = t.float()
        return t.numpy()
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _to_numpy(v) for k, v in vars(obj).items()})
    return obj


def _load_torch(path: str) -> Any:
    import pickle
    import warnings

    torch = require_torch()

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused a global: the file wants code run to load it.
        m = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+|[A-Z_]+ not supported[^\n.]*)", str(e))
        detail = f" ({m.group(1)})" if m else ""
        raise CheckpointError(
            f"{path}: refused to load, the file needs more than tensors, containers and "
            f"argparse.Namespace to unpickle{detail}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None


def _load_safetensors(path: str) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types.
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from None


def load_checkpoint_file(path: str) -> Any:
    """Reads a `.pt/.pth/.bin/.ckpt` or `.safetensors` file into NumPy containers."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(8)
    # A safetensors file starts with a little-endian header length then '{'.
    if len(head) == 8 and not path.endswith(TORCH_SUFFIXES):
        try:
            return _load_safetensors(path)
        except CheckpointError:
            pass
    return _to_numpy(_load_torch(path))


def select_state_dict(obj: Any, path: str, prefer=("ema", "model", "state_dict")) -> dict:
    """Picks the model weights out of a checkpoint.

    A plain state dict is returned as is; a training checkpoint
    (`{"model", "ema", "opt", "args"}`) gives its `ema` weights, which is
    what the original samples with.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    for key in prefer:
        sub = obj.get(key)
        if isinstance(sub, Mapping) and sub and all(isinstance(v, np.ndarray) for v in sub.values()):
            return dict(sub)
    keys = ", ".join(sorted(map(str, obj.keys()))[:8])
    raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys})")


def strip_prefix(sd: Mapping[str, np.ndarray], prefixes=("module.", "_orig_mod.")) -> dict:
    """Drops wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out
