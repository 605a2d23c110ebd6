"""FLOP accounting of the DiT forward and of cache schedules, and the chips' datasheet peaks.

A multiply-add counts 2 FLOPs; softmax, norms and biases are not counted. No
jax: `unit_flops` / `fixed_flops` are arithmetic on the config, so the FLOP
bound of a schedule can be read without a backend.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np


def _is_uvit(config) -> bool:
    return hasattr(config, "embed_dim")


def unit_flops(config, rows: int = 1) -> np.ndarray:
    """FLOPs of each cacheable unit for one forward of `rows` sequences, (num_units,): DiT's 2*depth, U-ViT's
    2*num_blocks (its sequence holds the time and label tokens too).

    Attention: qkv and output projections + scores (q k^T) + weighted values;
    MLP: fc1 + fc2. A multiply-add counts 2; softmax, norms and biases are not counted.
    """
    if _is_uvit(config):
        n, h, blocks = config.num_patches + config.extras, config.embed_dim, config.num_blocks
    else:
        n, h, blocks = (config.input_size // config.patch_size) ** 2, config.hidden_size, config.depth
    attn = 2 * n * h * 3 * h + 2 * n * n * h + 2 * n * n * h + 2 * n * h * h
    mlp = 2 * 2 * n * h * int(h * config.mlp_ratio)
    return np.tile(np.array([attn, mlp], np.float64) * rows, blocks)


def fixed_flops(config, rows: int = 1) -> float:
    """FLOPs every forward computes whatever the mask. DiT: patch embedding, timestep MLP, adaLN, final layer;
    U-ViT: patch embedding, the out blocks' skip projections, the output projection (and the time MLP and
    final conv where the model has them)."""
    p = config.patch_size
    if _is_uvit(config):
        n, h, c = config.num_patches + config.extras, config.embed_dim, config.in_chans
        patch = 2 * config.num_patches * p * p * c * h
        skips = (config.depth // 2) * 2 * n * 2 * h * h if config.skip else 0
        temb = 2 * 2 * h * 4 * h if config.mlp_time_embed else 0
        conv = 2 * config.img_size ** 2 * 9 * c * c if config.conv else 0
        return float(rows * (patch + skips + temb + 2 * n * h * p * p * c + conv))
    n = (config.input_size // config.patch_size) ** 2
    h = config.hidden_size
    patch = 2 * n * p * p * config.in_channels * h
    temb = 2 * (256 * h + h * h)
    adaln = config.depth * 2 * h * 6 * h
    final = 2 * h * 2 * h + 2 * n * h * p * p * config.out_channels
    return float(rows * (patch + temb + adaln + final))


def flop_bound(config, masks, steps: int) -> dict:
    """Speed-up the schedule allows: full FLOPs / kept FLOPs over all `steps` steps.

    masks: None (no cache) or (steps, num_units) bools, True = computed (U-ViT: one row per model evaluation).
    `bound` counts the cacheable units only (the issue's "share of transformer
    FLOPs that the masks keep"); `bound_with_fixed` adds the always-computed parts.
    """
    u = unit_flops(config)
    full_units = steps * u.sum()
    kept_units = full_units if masks is None else float((np.asarray(masks, bool) * u).sum())
    fixed = steps * fixed_flops(config)
    return dict(bound=full_units / kept_units, bound_with_fixed=(full_units + fixed) / (kept_units + fixed),
                unit_flops_full=full_units, unit_flops_kept=kept_units, fixed_flops=fixed,
                flop_share_kept=kept_units / full_units)


# Dense (no sparsity) peak TFLOP/s per chip, from the vendors' datasheets.
# Matched against `jax.Device.device_kind` in order: the first substring that occurs wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0}),
    ("H100 NVL", {"bfloat16": 835.0}),
    ("H100", {"bfloat16": 989.4}),       # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", {"bfloat16": 989.4}),
    ("H20", {"bfloat16": 148.0}),
    ("A100", {"bfloat16": 312.0}),
    ("L40S", {"bfloat16": 362.0}),
    ("L4", {"bfloat16": 121.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),  # v5e
    ("TPU v5", {"bfloat16": 459.0}),       # v5p
    ("TPU v6 lite", {"bfloat16": 918.0}),  # v6e
)


def peak_tflops(device_kind: str, dtype: str, override: float = 0.0) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from) for a device kind and dtype; (None, reason) when unknown."""
    if override:
        return float(override), "config.peak_tflops"
    for key, peaks in PEAK_TFLOPS:
        if key in device_kind:
            if dtype in peaks:
                return peaks[dtype], f"datasheet ({key}, dense {dtype})"
            return None, f"no {dtype} peak listed for {key}"
    return None, f"no datasheet peak for {device_kind!r} (set config.peak_tflops)"


def device_kind(machine: dict) -> str:
    """What the peak table is matched against: the accelerator's kind, or the CPU's model name."""
    if machine.get("backend") == "cpu" or not machine.get("devices"):
        return machine.get("cpu", "cpu")
    return machine["devices"][0]


def forward_flops(config, rows: int) -> float:
    """FLOPs of one full forward of `rows` sequences (every sub-layer computed)."""
    return float(unit_flops(config, rows).sum() + fixed_flops(config, rows))


def schedule_flops(config, masks, steps: int, rows: int) -> float:
    """FLOPs of `steps` sampler steps of `rows` sequences; masks None = the full schedule."""
    u = unit_flops(config, rows)
    kept = steps * u.sum() if masks is None else float((np.asarray(masks, bool)[:steps] * u).sum())
    return float(kept + steps * fixed_flops(config, rows))


def throughput_of_schedule(config, masks, steps: int, rows: int, full_s: float, l2c_s: float,
                           peak: Optional[float]) -> Dict[str, Any]:
    """Achieved TFLOP/s of the timed full and L2C runs (and MFU where the peak is known)."""
    full = schedule_flops(config, None, steps, rows) / full_s / 1e12
    l2c = schedule_flops(config, masks, steps, rows) / l2c_s / 1e12
    return dict(full_tflops=full, l2c_tflops=l2c, peak_tflops=peak,
                full_mfu=full / peak if peak else None, l2c_mfu=l2c / peak if peak else None)
