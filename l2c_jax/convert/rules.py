"""The generic rules that map a PyTorch state dict onto a Flax parameter tree.

Flax submodules are named like the PyTorch attributes, with a list index
joined by an underscore (`blocks.3.attn.qkv` -> `blocks_3/attn/qkv`,
`adaLN_modulation.1` -> `adaLN_modulation_1`), so conversion needs only:

- `weight` of a Linear -> `kernel`, transposed (out, in) -> (in, out);
- `weight` of a Conv2d -> `kernel`, (O, I, kh, kw) -> (kh, kw, I, O);
- `weight` of an Embedding -> `embedding`; of a norm -> `scale`;
- `bias` and any other name (e.g. `pos_embed`) unchanged.

Which rule applies is read off the Flax tree the model expects, and the
result is checked strictly: missing, unexpected or mis-shaped keys are one
error that names them.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from l2c_jax.errors import CheckpointError

_INDEX = re.compile(r"^\d+$")


def _flax_module_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    parts = torch_key.split(".")
    *mods, leaf = parts
    path: list[str] = []
    for p in mods:
        if _INDEX.match(p) and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), leaf


def flax_to_torch_name(flax_path: tuple[str, ...]) -> str:
    """The PyTorch name of a Flax leaf path (for error messages and export)."""
    *mods, leaf = flax_path
    out = []
    for m in mods:
        mm = re.match(r"^(.*)_(\d+)$", m)
        out.extend([mm.group(1), mm.group(2)] if mm else [m])
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join(out + [leaf])


def flatten_tree(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _summarise(keys, n=6):
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    return s + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], expected_params: Mapping, *, source: str = "checkpoint",
                  dtype=np.float32, consume: bool = False) -> dict:
    """Maps `state_dict` onto the structure of `expected_params`.

    `expected_params` is the Flax `params` tree (arrays or ShapeDtypeStructs,
    e.g. from `jax.eval_shape(module.init, ...)`). Returns a nested dict of
    NumPy arrays with exactly that structure, or raises `CheckpointError`
    naming every missing, unexpected and mis-shaped key.
    consume: pop each entry of `state_dict` (a dict) as it is converted, so a
    converter holding the only reference needs the weights' memory about once,
    not twice (the source tensor is freed as its converted copy is made).
    """
    expected = flatten_tree(expected_params)
    got: dict = {}
    unexpected, misshaped, nonfinite = [], [], []
    for key in list(state_dict.keys()):
        value = state_dict.pop(key) if consume else state_dict[key]
        mods, leaf = _flax_module_path(key)
        value = np.asarray(value)
        shape = value.shape
        if leaf == "weight":
            cands = [mods + (n,) for n in ("kernel", "embedding", "scale") if mods + (n,) in expected]
            if not cands:
                unexpected.append(key)
                continue
            path = cands[0]
            if path[-1] == "kernel":
                if value.ndim == 2:
                    value = value.T
                elif value.ndim == 4:
                    value = value.transpose(2, 3, 1, 0)
        else:
            path = mods + (leaf,)
            if path not in expected:
                unexpected.append(key)
                continue
        want = tuple(expected[path].shape)
        if tuple(value.shape) != want:
            misshaped.append(f"{key} {tuple(shape)} (expected {_torch_shape(path, want)})")
            continue
        # A fresh C-ordered array: it owns its memory (the source may be freed) and placing it on
        # the CPU aliases it instead of copying.
        got[path] = np.array(value, dtype=dtype, order="C", copy=True)
        del value
        if got[path].dtype.kind == "f" and not np.isfinite(got[path]).all():
            nonfinite.append(key)  # a diverged or damaged checkpoint converted and sampled black images
    missing = [flax_to_torch_name(p) for p in expected if p not in got and not any(
        flax_to_torch_name(p) == m.split(" ")[0] for m in misshaped)]
    problems = mismatch_report(missing, unexpected, misshaped)
    if problems:
        raise CheckpointError(f"{source} does not match the model: {problems}")
    if nonfinite:
        raise CheckpointError(f"{source}: {len(nonfinite)} tensor{'s hold' if len(nonfinite) > 1 else ' holds'} NaN "
                              f"or inf values ({_summarise(nonfinite)}); the checkpoint is damaged or its "
                              "training diverged (nothing was written)")
    return _unflatten(got)


def mismatch_report(missing, unexpected, misshaped) -> str:
    """One line naming the missing, unexpected and mis-shaped keys ('' when all match)."""
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_summarise(misshaped, 4)}")
    return "; ".join(problems)


def _torch_shape(path, flax_shape):
    if path[-1] == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    if path[-1] == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    return tuple(flax_shape)


def flax_to_torch(params: Mapping) -> dict:
    """The inverse mapping: a Flax params tree -> a PyTorch-named state dict of NumPy arrays."""
    out = {}
    for path, v in flatten_tree(params).items():
        v = np.asarray(v)
        if path[-1] == "kernel":
            v = v.T if v.ndim == 2 else v.transpose(3, 2, 0, 1)
        out[flax_to_torch_name(path)] = v
    return out
