"""PyTorch DiT checkpoint -> converted model directory."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Optional

import numpy as np

from l2c_jax import outputs
from l2c_jax.convert import diffusers_dit
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.dit import DIT_VARIANTS, DiTConfig
from l2c_jax.models.layers import sincos_pos_embed_2d
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


TIMESTEP_SHIFTS = ("diffusers", "original")


def read_diffusers(found: dict, path: str, timestep_shift: Optional[str] = None):
    """(original-named state dict, heads, numerics overrides) of a diffusers DiT (`diffusers_dit.locate`)."""
    cfg = diffusers_dit.read_json(found["config"])
    diffusers_dit.check_config(cfg, found["config"])
    sd = {}
    for w in found["weights"]:
        sd.update(select_state_dict(load_checkpoint_file(w), w))
    sd = diffusers_dit.to_original(sd, path)
    patch = int(cfg.get("patch_size", 2))
    hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    if "pos_embed" not in sd:  # diffusers recomputes the fixed table; so does the original
        sd["pos_embed"] = sincos_pos_embed_2d(hidden, int(cfg.get("sample_size", 32)) // patch)[None].astype(np.float32)
    # diffusers' own numerics unless the original's are asked for (the released routers were trained with those).
    original = (timestep_shift or "diffusers") == "original"
    numerics = dict(freq_shift=0, mlp_norm_eps=1e-6) if original else dict(
        freq_shift=1, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))
    return sd, int(cfg["num_attention_heads"]), numerics


def convert_dit(checkpoint: str, model: Optional[str] = None, num_heads: Optional[int] = None,
                num_classes: Optional[int] = None, timestep_shift: Optional[str] = None):
    """Reads a DiT checkpoint into a `Model`: the original's (plain or training, `ema` preferred), or
    diffusers' `DiTTransformer2DModel` (a transformer folder, a pipeline folder, or its weights file).

    timestep_shift (diffusers checkpoints): "diffusers" (default) keeps diffusers' numerics,
    "original" the original DiT's, which the released routers were trained with.
    """
    from l2c_jax.convert.rules import torch_to_flax
    from l2c_jax.model import Model, abstract_params

    if timestep_shift not in (None,) + TIMESTEP_SHIFTS:
        raise ConfigError(f"--timestep-shift {timestep_shift!r}: use one of {', '.join(TIMESTEP_SHIFTS)}")
    found = diffusers_dit.locate(checkpoint) if os.path.exists(checkpoint) else None
    numerics = {}
    if found is not None:
        sd, heads, numerics = read_diffusers(found, checkpoint, timestep_shift)
        if num_heads is not None and num_heads != heads:
            raise ConfigError(f"--num-heads {num_heads} contradicts the checkpoint's config.json ({heads} heads)")
        num_heads = heads
    else:
        if timestep_shift == "diffusers":
            raise ConfigError("--timestep-shift diffusers applies to diffusers checkpoints; this one is the original's")
        sd = strip_prefix(select_state_dict(load_checkpoint_file(checkpoint), checkpoint))
    config = dataclasses.replace(infer_dit_config(sd, checkpoint, model, num_heads, num_classes), **numerics)
    params = torch_to_flax(sd, abstract_params("dit", config), source=checkpoint, consume=True)
    return Model("dit", config, params)


def export_diffusers(model, directory: str) -> str:
    """Writes a DiT `Model` as a diffusers `DiTTransformer2DModel` folder (config.json + safetensors)."""
    import json

    from safetensors.numpy import save_file

    cfg = model.config
    # diffusers always runs its own embedding: say so rather than change a model's outputs silently.
    note = "" if cfg.freq_shift == 1 else ("note: diffusers runs its own timestep embedding (shift 1); "
                                           "this model was converted with the original's")
    sd, config = diffusers_dit.from_original(state_dict_of(model.params), cfg.depth, cfg)
    with outputs.staged(directory) as tmp:  # whole or not at all; the caller checked what is there
        os.makedirs(tmp)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()},
                  os.path.join(tmp, diffusers_dit.WEIGHTS[0]))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return note


def state_dict_of(params) -> dict:
    """Flax params -> the original's state-dict naming (NumPy), e.g. to compare or export."""
    from l2c_jax.convert.rules import flax_to_torch

    return {k: np.asarray(v) for k, v in flax_to_torch(params).items()}
