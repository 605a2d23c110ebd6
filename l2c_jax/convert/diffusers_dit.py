"""DiT in the diffusers format (`DiTTransformer2DModel`) <-> the original DiT's state-dict naming.

diffusers stores a DiT as a folder with `config.json` and
`diffusion_pytorch_model.safetensors` (or `.bin`, or shards with an index),
often inside a pipeline folder (`model_index.json`, `transformer/`, `vae/`,
`scheduler/`). Its names differ from the original's:

    pos_embed.proj                                   x_embedder.proj
    transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2}   t_embedder.mlp.{0,2}  (repeated per block)
    transformer_blocks.i.norm1.emb.class_embedder.embedding_table   y_embedder.embedding_table (repeated)
    transformer_blocks.i.norm1.linear                blocks.i.adaLN_modulation.1
    transformer_blocks.i.attn1.to_{q,k,v}            blocks.i.attn.qkv (concatenated q, k, v)
    transformer_blocks.i.attn1.to_out.0              blocks.i.attn.proj
    transformer_blocks.i.ff.net.0.proj, ff.net.2     blocks.i.mlp.fc1, fc2
    proj_out_1, proj_out_2                           final_layer.adaLN_modulation.1, final_layer.linear

and so does its arithmetic in two places: the timestep embedding divides the
frequency exponent by `half - 1` (`Timesteps(downscale_freq_shift=1)`; the
original by `half`), and the LayerNorm before each MLP uses the config's
`norm_eps` (1e-5; the original 1e-6). `DiTConfig.freq_shift` and
`DiTConfig.mlp_norm_eps` record which numerics a converted model runs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from l2c_jax.errors import CheckpointError

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "DiTTransformer2DModel"

# diffusers name (after the block prefix) -> original name, for the per-block weights.
_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
# The conditioning embedders every block repeats, and where the original keeps them once.
_EMBEDDERS = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
        "proj_out_2": "final_layer.linear"}


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return out


def locate(path: str) -> Optional[dict]:
    """Where a diffusers DiT's parts are, or None when `path` is not in the diffusers format.

    Accepts a pipeline folder (model_index.json + transformer/), a transformer
    folder (config.json naming DiTTransformer2DModel + weights), or a weights
    file with that config.json beside it. Returns dict(config, weights (a list
    of files), pipeline (the pipeline folder or None)).
    """
    path = os.path.abspath(os.fspath(path))
    pipeline = None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        pipeline, path = path, os.path.join(path, "transformer")
        if not os.path.isdir(path):
            raise CheckpointError(f"{pipeline}: a diffusers pipeline folder without transformer/")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        if pipeline:
            raise CheckpointError(f"{folder}: no config.json")
        return None
    cfg = read_json(config)
    if cfg.get("_class_name") != CLASS_NAME:
        if pipeline or os.path.isdir(path):
            raise CheckpointError(f"{config}: a {cfg.get('_class_name', 'non-diffusers')} config, not {CLASS_NAME}")
        return None
    if not os.path.isdir(path):
        weights = [path]
    elif os.path.isfile(os.path.join(folder, INDEX)):
        index = read_json(os.path.join(folder, INDEX)).get("weight_map", {})
        weights = [os.path.join(folder, f) for f in sorted(set(index.values()))]
    else:
        weights = [os.path.join(folder, w) for w in WEIGHTS if os.path.isfile(os.path.join(folder, w))][:1]
        if not weights:
            raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS)}")
    if pipeline is None and os.path.isfile(os.path.join(os.path.dirname(folder), "model_index.json")):
        pipeline = os.path.dirname(folder)
    return dict(config=config, weights=weights, pipeline=pipeline)


def check_config(cfg: dict, path: str) -> None:
    """Refuses what this DiT cannot run (other norms, activations, cross-attention)."""
    wants = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False,
                 attention_bias=True)
    for key, want in wants.items():
        if key in cfg and cfg[key] != want:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r}; this DiT runs {want!r} only")
    if cfg.get("num_embeds_ada_norm") in (None, 0):
        raise CheckpointError(f"{path}: num_embeds_ada_norm is unset; a class-conditional DiT needs it")


def to_original(sd: dict, path: str) -> dict:
    """diffusers state dict -> the original DiT's names; the repeated embedders must agree across blocks."""
    out, depth = {}, 0
    for k, v in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m is None:
            if k == "pos_embed.pos_embed":
                out["pos_embed"] = v
                continue
            mt = re.match(r"(.+)\.(weight|bias)$", k)
            if mt is None or mt.group(1) not in _TOP:
                raise CheckpointError(f"{path}: unexpected key {k} for a {CLASS_NAME}")
            out[f"{_TOP[mt.group(1)]}.{mt.group(2)}"] = v
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        depth = max(depth, i + 1)
        if name in _EMBEDDERS:
            key = f"{_EMBEDDERS[name]}.{kind}"
            if i == 0:
                out[key] = v
            continue
        if name in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            continue  # joined below
        if name not in _BLOCK:
            raise CheckpointError(f"{path}: unexpected key {k} for a {CLASS_NAME}")
        out[f"blocks.{i}.{_BLOCK[name]}.{kind}"] = v
    for i in range(depth):
        pre = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            parts = [sd.get(f"{pre}.attn1.to_{x}.{kind}") for x in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"{path}: missing {pre}.attn1.to_q/k/v.{kind}")
            out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
        for name, orig in _EMBEDDERS.items():
            for kind in ("weight", "bias"):
                a, b = sd.get(f"transformer_blocks.0.{name}.{kind}"), sd.get(f"{pre}.{name}.{kind}")
                if a is None and b is None:
                    continue
                if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                    raise CheckpointError(
                        f"{path}: block {i}'s {name}.{kind} differs from block 0's; the original DiT has one "
                        f"{orig.split('.')[0]} for all blocks, so this checkpoint cannot be converted")
    return out


def from_original(sd: dict, num_blocks: int, cfg) -> tuple[dict, dict]:
    """The original's state dict (NumPy) and a `DiTConfig` -> (diffusers state dict, config.json)."""
    out = {}
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    emb = {v: k for k, v in _EMBEDDERS.items()}
    for k, v in sd.items():
        stem, _, kind = k.rpartition(".")
        if k == "pos_embed":
            continue  # diffusers recomputes the fixed table (a non-persistent buffer)
        elif stem in top:
            out[f"{top[stem]}.{kind}"] = v
        elif stem in emb:
            for i in range(num_blocks):
                out[f"transformer_blocks.{i}.{emb[stem]}.{kind}"] = v
        elif (m := re.match(r"blocks\.(\d+)\.(.+)$", stem)) and m.group(2) == "attn.qkv":
            for name, part in zip("qkv", np.split(v, 3, axis=0)):
                out[f"transformer_blocks.{m.group(1)}.attn1.to_{name}.{kind}"] = np.ascontiguousarray(part)
        elif m and m.group(2) in block:
            out[f"transformer_blocks.{m.group(1)}.{block[m.group(2)]}.{kind}"] = v
        else:
            raise CheckpointError(f"no diffusers name for {k}")
    config = dict(_class_name=CLASS_NAME, num_attention_heads=cfg.num_heads,
                  attention_head_dim=cfg.hidden_size // cfg.num_heads, in_channels=cfg.in_channels,
                  out_channels=cfg.out_channels, num_layers=cfg.depth, sample_size=cfg.input_size,
                  patch_size=cfg.patch_size, activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes,
                  norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=cfg.mlp_norm_eps,
                  attention_bias=True, dropout=0.0, upcast_attention=False, norm_num_groups=32)
    return out, config


# The schedule the samplers assume (l2c_jax.diffusion.gaussian): DiT's linear betas over 1000 steps.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def check_scheduler(pipeline: str) -> dict:
    """The pipeline's scheduler config, refused unless it is the schedule the samplers assume."""
    path = os.path.join(pipeline, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{pipeline}: no scheduler/scheduler_config.json to check the noise schedule against")
    cfg = read_json(path)
    for key, want in SCHEDULE.items():
        got = cfg.get(key, want)
        same = np.isclose(float(got), float(want)) if isinstance(want, float) else got == want
        if not same:
            raise CheckpointError(f"{path}: {key}={got!r}, but the samplers run DiT's schedule ({key}={want!r}); "
                                  "this pipeline's model was trained for another noise schedule")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{path}: prediction_type={cfg['prediction_type']!r}; DiT predicts epsilon")
    return cfg
