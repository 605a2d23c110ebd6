"""PyTorch U-ViT checkpoint (baofff/U-ViT `libs/uvit.py` naming) -> converted model directory."""

from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.uvit import UVIT_VARIANTS, UViTConfig
from l2c_jax.torch_io import load_checkpoint_file, select_state_dict, strip_prefix


def _need(sd, key, path):
    if key not in sd:
        raise CheckpointError(f"{path}: not a U-ViT checkpoint, missing key {key}")
    return sd[key]


def _indices(sd, prefix):
    return {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}


def infer_uvit_config(sd: dict, path: str, model: Optional[str] = None,
                      num_heads: Optional[int] = None) -> UViTConfig:
    """Reads the architecture off the weights; `model` / `num_heads` give the head count."""
    proj = _need(sd, "patch_embed.proj.weight", path)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise CheckpointError(f"{path}: patch_embed.proj.weight has shape {proj.shape}, expected (D, C, p, p)")
    embed, in_chans, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])

    n_in, n_out = _indices(sd, "in_blocks"), _indices(sd, "out_blocks")
    if n_in != set(range(len(n_in))) or n_out != set(range(len(n_out))):
        raise CheckpointError(f"{path}: block indices are not contiguous (in_blocks {sorted(n_in)}, "
                              f"out_blocks {sorted(n_out)})")
    if len(n_in) != len(n_out):
        raise CheckpointError(f"{path}: {len(n_in)} in_blocks but {len(n_out)} out_blocks")
    depth = 2 * len(n_in)
    fc1 = _need(sd, "mid_block.mlp.fc1.weight", path)
    mlp_ratio = float(fc1.shape[0]) / embed

    num_classes = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else -1
    extras = 2 if num_classes > 0 else 1
    pos = _need(sd, "pos_embed", path)
    if pos.ndim != 3 or pos.shape[1] <= extras:
        raise CheckpointError(f"{path}: pos_embed has shape {pos.shape}, expected (1, {extras} + patches, D)")
    grid = math.isqrt(int(pos.shape[1]) - extras)
    if grid * grid != pos.shape[1] - extras:
        raise CheckpointError(f"{path}: pos_embed has {pos.shape[1]} tokens, not {extras} extra tokens "
                              "plus a square grid")
    dec = _need(sd, "decoder_pred.weight", path)
    if dec.shape[0] != patch * patch * in_chans:
        raise CheckpointError(f"{path}: decoder_pred gives {dec.shape[0]} values per patch, expected "
                              f"{patch * patch * in_chans} (patch {patch}, {in_chans} channels)")
    qkv_bias = any(re.search(r"\.attn\.qkv\.bias$", k) for k in sd)
    skip = depth == 0 or "out_blocks.0.skip_linear.weight" in sd

    if model is not None:
        if model not in UVIT_VARIANTS:
            raise ConfigError(f"unknown U-ViT model {model!r}; known: {', '.join(UVIT_VARIANTS)} "
                              "(or pass --num-heads)")
        v_embed, v_depth, v_heads, v_patch = UVIT_VARIANTS[model]
        if (v_depth, v_embed, v_patch) != (depth, embed, patch):
            raise CheckpointError(
                f"{path}: weights are depth {depth}, width {embed}, patch {patch}, but {model} is depth "
                f"{v_depth}, width {v_embed}, patch {v_patch}")
        if num_heads is not None and num_heads != v_heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts {model} ({v_heads} heads)")
        num_heads = v_heads
    if num_heads is None:
        raise ConfigError("the head count is not in the weights: pass --model (e.g. U-ViT-H/2) or --num-heads N")
    if num_heads <= 0 or embed % num_heads:
        raise ConfigError(f"width {embed} is not divisible by {num_heads} heads")

    return UViTConfig(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed, depth=depth,
                      num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      mlp_time_embed="time_embed.0.weight" in sd, num_classes=num_classes,
                      conv="final_layer.weight" in sd, skip=skip)


def convert_uvit(checkpoint: str, model: Optional[str] = None, num_heads: Optional[int] = None):
    """Reads a U-ViT checkpoint (plain or training, `ema` preferred) into a `Model`."""
    from l2c_jax.convert.rules import torch_to_flax
    from l2c_jax.model import Model, abstract_params

    sd = strip_prefix(select_state_dict(load_checkpoint_file(checkpoint), checkpoint))
    config = infer_uvit_config(sd, checkpoint, model, num_heads)
    params = torch_to_flax(sd, abstract_params("uvit", config), source=checkpoint, consume=True)
    return Model("uvit", config, params)


def state_dict_of(params) -> dict:
    """Flax params -> the original's state-dict naming (NumPy)."""
    from l2c_jax.convert.rules import flax_to_torch

    return {k: np.asarray(v) for k, v in flax_to_torch(params).items()}
