"""PyTorch DiT checkpoint -> converted model directory."""

from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.dit import DIT_VARIANTS, DiTConfig
from l2c_jax.torch_io import load_checkpoint_file, select_state_dict, strip_prefix


def _need(sd, key, path):
    if key not in sd:
        raise CheckpointError(f"{path}: not a DiT checkpoint, missing key {key}")
    return sd[key]


def infer_dit_config(sd: dict, path: str, model: Optional[str] = None, num_heads: Optional[int] = None,
                     num_classes: Optional[int] = None) -> DiTConfig:
    """Reads the architecture off the weights; `model` / `num_heads` give the head count."""
    proj = _need(sd, "x_embedder.proj.weight", path)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{path}: x_embedder.proj.weight has shape {proj.shape}, expected (D, C, p, p)")
    hidden, in_ch, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    pos = _need(sd, "pos_embed", path)
    grid = math.isqrt(int(pos.shape[1]))
    if grid * grid != pos.shape[1]:
        raise CheckpointError(f"{path}: pos_embed has {pos.shape[1]} tokens, not a square grid")
    out = int(_need(sd, "final_layer.linear.weight", path).shape[0]) // (patch * patch)
    if out not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{path}: final layer gives {out} channels for {in_ch} input channels")
    rows = int(_need(sd, "y_embedder.embedding_table.weight", path).shape[0])
    fc1 = _need(sd, "blocks.0.mlp.fc1.weight", path) if depth else None
    mlp_ratio = float(fc1.shape[0]) / hidden if fc1 is not None else 4.0

    if model is not None:
        if model not in DIT_VARIANTS:
            raise ConfigError(f"unknown DiT model {model!r}; known: {', '.join(DIT_VARIANTS)} (or pass --num-heads)")
        v_depth, v_hidden, v_patch, v_heads = DIT_VARIANTS[model]
        if (v_depth, v_hidden, v_patch) != (depth, hidden, patch):
            raise CheckpointError(
                f"{path}: weights are depth {depth}, width {hidden}, patch {patch}, but {model} is depth "
                f"{v_depth}, width {v_hidden}, patch {v_patch}")
        if num_heads is not None and num_heads != v_heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts {model} ({v_heads} heads)")
        num_heads = v_heads
    if num_heads is None:
        raise ConfigError("the head count is not in the weights: pass --model (e.g. DiT-XL/2) or --num-heads N")
    if hidden % num_heads:
        raise ConfigError(f"width {hidden} is not divisible by {num_heads} heads")

    # The released models keep a null-class row for classifier-free guidance.
    if num_classes is None:
        num_classes = rows - 1
    if rows not in (num_classes, num_classes + 1):
        raise CheckpointError(f"{path}: label table has {rows} rows, inconsistent with {num_classes} classes")
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
                     depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0,
                     num_classes=num_classes, learn_sigma=out == 2 * in_ch)


def convert_dit(checkpoint: str, model: Optional[str] = None, num_heads: Optional[int] = None,
                num_classes: Optional[int] = None):
    """Reads a DiT checkpoint (plain or training, `ema` preferred) into a `Model`."""
    from l2c_jax.convert.rules import torch_to_flax
    from l2c_jax.model import Model, abstract_params

    sd = strip_prefix(select_state_dict(load_checkpoint_file(checkpoint), checkpoint))
    config = infer_dit_config(sd, checkpoint, model, num_heads, num_classes)
    params = torch_to_flax(sd, abstract_params("dit", config), source=checkpoint, consume=True)
    return Model("dit", config, params)


def state_dict_of(params) -> dict:
    """Flax params -> the original's state-dict naming (NumPy), e.g. to compare or export."""
    from l2c_jax.convert.rules import flax_to_torch

    return {k: np.asarray(v) for k, v in flax_to_torch(params).items()}
