"""pytorch-fid's FID Inception-v3 state dict (`pt_inception-2015-12-05-6726825d.pth`) -> Flax params.

The Flax tree (`l2c_jax.models.inception`) is named after the PyTorch
attributes, so the generic rules of `l2c_jax.convert.rules.torch_to_flax`
convert it. The strict check of keys and shapes is done here first, against
the keys as the file spells them (the generic `flax_to_torch_name` would read
`branch5x5_1` as a list index); `num_batches_tracked` buffers are optional
(the released file lacks them) and dropped.

    params = convert_inception("pt_inception-2015-12-05-6726825d.pth")
    save_inception("ckpt/inception_fid", params)
    # then l2c_jax.eval.inception.load_inception("ckpt/inception_fid")
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from l2c_jax.convert.rules import flatten_tree
from l2c_jax.errors import CheckpointError
from l2c_jax.models.inception import NUM_CLASSES, abstract_inception_params

FAMILY = "inception_fid"
_BUFFER = "num_batches_tracked"
_LEAF_NAMES = {"kernel": "weight", "scale": "weight"}


def torch_name(flax_path: Tuple[str, ...]) -> str:
    """`Mixed_5b/branch5x5_1/conv/kernel` -> `Mixed_5b.branch5x5_1.conv.weight`."""
    *mods, leaf = flax_path
    return ".".join(list(mods) + [_LEAF_NAMES.get(leaf, leaf)])


def _torch_shape(flax_path, shape) -> tuple:
    if flax_path[-1] == "kernel" and len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if flax_path[-1] == "kernel" and len(shape) == 2:
        return tuple(reversed(shape))
    return tuple(shape)


def expected_keys() -> Dict[str, tuple]:
    """{state-dict key: PyTorch shape} of every parameter and BN statistic (no num_batches_tracked)."""
    return {torch_name(p): _torch_shape(p, tuple(a.shape)) for p, a in flatten_tree(abstract_inception_params()).items()}


def inception_params_from_state_dict(sd: Mapping[str, Any], path: str = "checkpoint") -> dict:
    """A pytorch-fid `fid_inception_v3()` state dict -> the Flax params tree (NumPy float32)."""
    from l2c_jax.convert.rules import mismatch_report, torch_to_flax
    from l2c_jax.torch_io import strip_prefix

    sd = {k: v for k, v in strip_prefix(sd).items() if k.rsplit(".", 1)[-1] != _BUFFER}
    expected = expected_keys()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} {tuple(np.shape(v))} (expected {expected[k]})" for k, v in sd.items()
                 if k in expected and tuple(np.shape(v)) != expected[k]]
    problems = mismatch_report(missing, unexpected, misshaped)
    if problems:
        raise CheckpointError(f"{path} is not pytorch-fid's FID Inception-v3 ({len(expected)} weights, "
                              f"fc to {NUM_CLASSES} classes): {problems}")
    return torch_to_flax(sd, abstract_inception_params(), source=path)


def convert_inception(path: str) -> dict:
    """Reads the state dict file (no arbitrary unpickling) -> Flax params."""
    from l2c_jax.torch_io import load_checkpoint_file, select_state_dict

    path = os.fspath(path)
    sd = select_state_dict(load_checkpoint_file(path), path, prefer=("state_dict", "model"))
    return inception_params_from_state_dict(sd, path)


def save_inception(directory: str, params: Any, overwrite: bool = False, **extra) -> None:
    """Writes DIR/config.json (family "inception_fid", format_version) and DIR/params (orbax)."""
    from l2c_jax import checkpoint

    checkpoint.write_model_dir(directory, FAMILY, {"num_classes": NUM_CLASSES}, params, overwrite=overwrite,
                               **extra)
