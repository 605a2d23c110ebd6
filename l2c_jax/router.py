"""Learning-to-Cache routers: loading, cache masks and the released formats.

A router is one row of free parameters per sampler step (or per model call
slot, for U-ViT), `2 * num_blocks` columns wide; `beta = sigmoid(prob)`, and
at inference `beta > threshold` says which sub-layers a cache step computes
(True) and which reuse the cached output of the previous step (False).
Column 2i is the attention branch of block i, 2i+1 its MLP.

Two kinds, after the two samplers of the original code:

- "dit-ddim": DiT with DDIM. One row per sampler step, indexed by the
  RESPACED index of the step (sampling runs from index steps-1 down to 0).
  Sampler steps alternate full / cache starting with a full step; cache step
  s (s odd) uses row steps-1-s. The original decides full vs cache from a
  step counter's parity and looks masks up only for even respaced indices,
  so an odd step count cannot work with a router: that is an error here.
- "uvit-dpm2": U-ViT with singlestep DPM-Solver-2. The released files hold
  NFE rows, but only rows 1..NFE//2-1 are used: row k is the first model
  evaluation of solver step k (the original maps the step's start time
  round(1000 t_k) to k), whose cache was filled by the midpoint evaluation of
  step k-1. Step 0 and every midpoint evaluation are full. Masks cover the
  NFE//2 first evaluations.

Formats read by `load_router`: the released DiT `DDIM*_router.pt`
(`{"routers": {"<i>.prob"}, "opt", "args"}`), the released U-ViT
`dpm*_router.pth` (`{"<i>.prob"}`), and this project's `.safetensors` (a
`(rows, units)` float32 `prob` plus string metadata), or a directory holding
`router.safetensors`; a router trained with learned forecasts also holds
`forecast_coefs` (rows, units, 2): per row and unit, the coefficients of d1
and d2 a reused unit's value is advanced by (`l2c_jax.sampling.forecast`;
Taylor's own are 1 and (2j-1)/2, j steps after the period start); one whose
full steps are placed rather than periodic records them as metadata "anchors"
(sampler steps, comma-separated). Its metadata
records a format version, checked
before anything else (versions and the rule: `l2c_jax.formats`). Nothing is
unpickled beyond tensors, containers and `argparse.Namespace` (see
`l2c_jax.torch_io`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from l2c_jax import formats
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.torch_io import load_checkpoint_file, require_torch, strip_prefix

KINDS = ("dit-ddim", "uvit-dpm2")
FORMAT_NAME = "l2c_jax.router"
FORMAT_VERSION = formats.ROUTER_VERSION
FILE_NAME = "router.safetensors"  # inside a directory

_ROW_KEY = re.compile(r"^(?:routers\.)?(\d+)\.prob$")


def _sigmoid32(x: np.ndarray) -> np.ndarray:
    """sigmoid in float32, as the original's torch.sigmoid on float32 parameters."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown router kind {kind!r} (known: {', '.join(KINDS)})")
    return kind


@dataclasses.dataclass
class Router:
    """A trained router.

    prob: (steps, num_units) float32 raw parameters (before the sigmoid).
    kind: "dit-ddim" or "uvit-dpm2" (see the module docstring).
    threshold: the threshold it was trained / released for, when known.
    source: where it was read from, for messages.
    """

    prob: np.ndarray
    kind: str
    threshold: Optional[float] = None
    source: Optional[str] = None
    period: int = 2  # dit-ddim: a full step, then period-1 cache steps (2: the original L2C)
    forecast: str = "copy"  # how reused units were formed in training ("copy", "taylor1", "taylor2")
    # Learned forecasts: (rows, num_units, 2) coefficients of d1, d2 per row and unit; None: Taylor's own.
    coefs: Optional[np.ndarray] = None
    # dit-ddim: the sampler steps (sampling order, from 0) that compute every unit, when not every period-th
    # (`l2c_jax.schedule.anchor_layout`); the steps between them are its cache steps. None: the period's.
    anchors: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        _check_kind(self.kind)
        prob = np.asarray(self.prob)
        where = f"{self.source}: " if self.source else ""
        self.period = int(self.period)
        if self.period < 2 or (self.kind != "dit-ddim" and self.period != 2):
            raise ConfigError(f"{where}router period {self.period}: dit-ddim routers take 2 or more, "
                              f"uvit-dpm2 routers 2")
        if self.forecast not in ("copy", "taylor1", "taylor2") or (self.kind != "dit-ddim" and self.forecast != "copy"):
            raise ConfigError(f"{where}router forecast {self.forecast!r}: dit-ddim routers take copy, taylor1 or "
                              f"taylor2, uvit-dpm2 routers copy")
        if prob.ndim != 2 or prob.shape[0] < 1 or prob.shape[1] < 1:
            raise ConfigError(f"{where}router prob must be a non-empty (steps, units) array, got shape {prob.shape}")
        if prob.shape[1] % 2:
            raise ConfigError(f"{where}router rows have {prob.shape[1]} columns; expected an even count "
                              "(attention and MLP of each block)")
        if not np.isfinite(prob).all():
            raise ConfigError(f"{where}router holds non-finite values")
        self.prob = np.ascontiguousarray(prob, dtype=np.float32)
        if self.coefs is not None:
            coefs = np.asarray(self.coefs)
            if self.forecast == "copy":
                raise ConfigError(f"{where}router holds learned forecast coefficients but copies (forecast 'copy')")
            if coefs.shape != prob.shape + (2,):
                raise ConfigError(f"{where}router forecast coefficients have shape {coefs.shape}, expected "
                                  f"{prob.shape + (2,)} (rows, units, d1 and d2)")
            if not np.isfinite(coefs).all():
                raise ConfigError(f"{where}router forecast coefficients hold non-finite values")
            self.coefs = np.ascontiguousarray(coefs, dtype=np.float32)
        if self.anchors is not None:
            a = tuple(int(v) for v in self.anchors)
            if self.kind != "dit-ddim":
                raise ConfigError(f"{where}router anchors: only dit-ddim routers place their full steps")
            if not a or a[0] != 0 or any(q <= p for p, q in zip(a, a[1:])) or a[-1] >= prob.shape[0] or \
                    len(a) == prob.shape[0]:
                raise ConfigError(f"{where}router anchors {list(a)}: expected steps rising from 0, below "
                                  f"{prob.shape[0]}, with at least one cache step between or after them")
            self.anchors = a
        if self.threshold is not None:
            self.threshold = float(self.threshold)

    # -- shape ---------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Router rows: sampler steps for "dit-ddim", NFE for "uvit-dpm2" (the original's num_steps)."""
        return int(self.prob.shape[0])

    @property
    def num_units(self) -> int:
        """Cacheable sub-layers per model call: 2 * blocks."""
        return int(self.prob.shape[1])

    @property
    def num_blocks(self) -> int:
        return self.num_units // 2

    @property
    def sampler_steps(self) -> int:
        """Rows of `masks()`: DDIM steps, or DPM-Solver-2 steps (NFE // 2)."""
        return self.steps if self.kind == "dit-ddim" else self.steps // 2

    # -- values --------------------------------------------------------------
    def beta(self) -> np.ndarray:
        """sigmoid(prob), (steps, num_units) float32; used as the training-time interpolation weight."""
        return _sigmoid32(self.prob)

    def _threshold(self, threshold: Optional[float]) -> float:
        if threshold is None:
            threshold = self.threshold
        if threshold is None:
            raise ConfigError("no threshold given (pass threshold=, or --threshold) and the router carries no default one")
        return float(threshold)

    def anchor_rows(self) -> np.ndarray:
        """(sampler_steps,) bool, sampling order: the full steps (dit-ddim: its anchors, or every period-th)."""
        out = np.zeros(self.sampler_steps, bool)
        if self.kind == "dit-ddim":
            out[list(self.anchors) if self.anchors is not None else slice(None, None, self.period)] = True
        else:
            out[:1] = True
        return out

    def cache_steps(self) -> list:
        """Sampler steps (sampling order) that reuse the cache: for dit-ddim all but its anchors."""
        if self.kind == "dit-ddim":
            self._check_even_dit()
        return [int(s) for s in np.flatnonzero(~self.anchor_rows())]

    def cache_rows(self) -> list:
        """Router rows the cache steps use, ascending (the rows the original thresholds)."""
        if self.kind == "dit-ddim":
            return sorted(self.steps - 1 - s for s in self.cache_steps())
        return self.cache_steps()

    def _row_of_step(self, s: int) -> int:
        return self.steps - 1 - s if self.kind == "dit-ddim" else s

    def _check_even_dit(self):
        if self.kind == "dit-ddim" and self.anchors is None and self.period == 2 and self.steps % 2:
            raise ConfigError(
                f"a dit-ddim router needs an even number of steps, this one has {self.steps}: the original "
                "alternates full and cache steps by parity and only has masks for even respaced indices"
            )

    def masks(self, threshold: Optional[float] = None, steps: Optional[int] = None) -> np.ndarray:
        """Compute masks in sampling order: (sampler_steps, num_units) bool, True = compute.

        Full steps are all True. `steps`, when given, is the sampler's step
        count (DDIM steps, or DPM-Solver-2 steps = NFE//2) and must match.
        """
        thr = np.float32(self._threshold(threshold))  # torch compares float32 with the scalar cast to float32
        self._check_even_dit()
        if steps is not None and int(steps) != self.sampler_steps:
            name = f"router {self.source}" if self.source else "the router"
            raise ConfigError(f"{name} is for {self.sampler_steps} {self._step_word()}, the sampler runs {steps}")
        if self.kind == "uvit-dpm2" and self.sampler_steps < 1:
            raise ConfigError(f"a uvit-dpm2 router needs at least 2 rows (NFE), this one has {self.steps}")
        beta = self.beta()
        out = np.ones((self.sampler_steps, self.num_units), dtype=bool)
        for s in self.cache_steps():
            out[s] = beta[self._row_of_step(s)] > thr
        return out

    def _step_word(self) -> str:
        return "DDIM steps" if self.kind == "dit-ddim" else "DPM-Solver-2 steps"

    def counts(self, threshold: Optional[float] = None) -> tuple:
        """(computed, total) sub-layers over the cache steps."""
        m = self.masks(threshold)
        cs = self.cache_steps()
        return int(m[cs].sum()), len(cs) * self.num_units

    def removed_ratio(self, threshold: Optional[float] = None) -> float:
        computed, total = self.counts(threshold)
        return 1.0 - computed / total if total else 0.0

    def summary(self, threshold: Optional[float] = None) -> str:
        """`cache steps compute 312/560 sub-layers (44.29% removed)`."""
        computed, total = self.counts(threshold)
        removed = 100.0 * (1.0 - computed / total) if total else 0.0
        return f"cache steps compute {computed}/{total} sub-layers ({removed:.2f}% removed)"

    def describe(self) -> str:
        """One line: kind and shape."""
        placed = f"{len(self.anchors)} full steps at {','.join(map(str, self.anchors))}" if self.anchors else \
            f"cache period {self.period}"
        extra = "" if self.period == 2 and self.anchors is None and self.forecast == "copy" else \
            f", {placed}, {self.forecast} forecast" + (" (learned)" if self.coefs is not None else "")
        return (f"{self.kind} router, {self.steps} rows x {self.num_units} sub-layers "
                f"({self.num_blocks} blocks, {self.sampler_steps} {self._step_word()}{extra})")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

def _rows_from_dict(d: Mapping[str, Any], path: str) -> np.ndarray:
    """`{"<i>.prob": (units,)}` -> (rows, units), checking the rows are 0..n-1 and equally long."""
    rows, unexpected = {}, []
    for k, v in d.items():
        m = _ROW_KEY.match(str(k))
        if not m:
            unexpected.append(str(k))
            continue
        rows[int(m.group(1))] = v
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:6]) + (" ..." if len(unexpected) > 6 else "")
        raise CheckpointError(f"{path}: not a router state dict, unexpected keys: {shown} (expected '<i>.prob')")
    if not rows:
        raise CheckpointError(f"{path}: no router rows ('<i>.prob' keys) found")
    n = max(rows) + 1
    missing = sorted(set(range(n)) - set(rows))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: router rows are not contiguous, missing {shown} of 0..{n - 1}")
    arrs = []
    for i in range(n):
        a = rows[i]
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            shape = getattr(a, "shape", type(a).__name__)
            raise CheckpointError(f"{path}: router row {i}.prob must be a 1-D tensor, got {shape}")
        arrs.append(a)
    lengths = sorted({a.shape[0] for a in arrs})
    if len(lengths) > 1:
        by_len = {L: [i for i, a in enumerate(arrs) if a.shape[0] == L][:4] for L in lengths}
        raise CheckpointError(f"{path}: router rows have different lengths: "
                              + "; ".join(f"{L} (rows {', '.join(map(str, r))})" for L, r in by_len.items()))
    if lengths[0] % 2:
        raise CheckpointError(f"{path}: router rows have {lengths[0]} columns; expected an even count "
                              "(attention and MLP of each block)")
    return np.stack(arrs).astype(np.float32)


def _meta_int(meta: Mapping[str, str], key: str, path: str) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: router metadata {key!r} missing or not an integer") from None


def _migrate_hint(kind) -> str:
    kind_arg = f" --kind {kind}" if kind in KINDS else ""
    return (f"convert the released router again: python convert/router.py --checkpoint ROUTER.pt{kind_arg} "
            "--out NEW.safetensors (a router trained here: train it again)")


def _safetensors_meta(path: str) -> Optional[dict]:
    """The string metadata of a safetensors file (empty when it has none); None for any other file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # a PyTorch file, or unreadable (then load_checkpoint_file has said so already)
        return None


def _load_project(path: str, tensors: Mapping[str, np.ndarray], kind: Optional[str],
                  meta: Optional[dict]) -> Router:
    if meta is None or meta.get("format") != FORMAT_NAME:
        found = "not a safetensors file" if meta is None else f"metadata format {meta.get('format')!r}"
        raise CheckpointError(f"{path}: holds 'prob' but is not an {FORMAT_NAME} file ({found})")
    # The version first: a newer format may lay out its tensors differently.
    formats.check_format_version(meta.get(formats.FIELD), FORMAT_VERSION, "router", path,
                                 _migrate_hint(meta.get("kind")), oldest=formats.ROUTER_OLDEST,
                                 missing=formats.FIELD not in meta)
    # Format 1 has no forecast coefficients, which is what a router without them loads as: no upgrade needed.
    prob = tensors.get("prob")
    if not isinstance(prob, np.ndarray) or prob.ndim != 2:
        shape = getattr(prob, "shape", None)
        raise CheckpointError(f"{path}: {FORMAT_NAME} file without a 2-D 'prob' tensor"
                              + (f" (found shape {shape})" if shape is not None else ""))
    file_kind = meta.get("kind")
    if file_kind not in KINDS:
        raise CheckpointError(f"{path}: router metadata kind {file_kind!r} is not one of {', '.join(KINDS)}")
    if kind is not None and kind != file_kind:
        raise ConfigError(f"{path}: router kind {kind!r} was asked for but the file is a {file_kind!r} router")
    steps, units = _meta_int(meta, "steps", path), _meta_int(meta, "num_units", path)
    if prob.shape != (steps, units):
        raise CheckpointError(f"{path}: prob has shape {prob.shape} but the metadata says ({steps}, {units})")
    thr = meta.get("threshold") or None
    try:
        thr = float(thr) if thr is not None else None
    except ValueError:
        raise CheckpointError(f"{path}: router metadata threshold {thr!r} is not a number") from None
    period = _meta_int(meta, "period", path) if meta.get("period") else 2  # files before periods: L2C's 2
    coefs = tensors.get("forecast_coefs")
    if coefs is not None and (not isinstance(coefs, np.ndarray) or coefs.shape != (steps, units, 2)):
        raise CheckpointError(f"{path}: forecast_coefs has shape {getattr(coefs, 'shape', None)}, expected "
                              f"({steps}, {units}, 2)")
    anchors = meta.get("anchors") or None
    try:
        anchors = None if anchors is None else tuple(int(v) for v in anchors.split(","))
    except ValueError:
        raise CheckpointError(f"{path}: router metadata anchors {anchors!r} is not a list of steps") from None
    try:
        return Router(prob=prob, kind=file_kind, threshold=thr, source=path, period=period,
                      forecast=meta.get("forecast") or "copy", coefs=coefs, anchors=anchors)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_router(path, kind: Optional[str] = None, threshold: Optional[float] = None) -> Router:
    """Reads a router from a released `.pt`/`.pth`, the project's `.safetensors`, or a directory.

    `kind` defaults from the file: the project format records it; the released
    DiT layout (`{"routers": ...}`) means "dit-ddim"; a plain `{"<i>.prob"}`
    dict means "uvit-dpm2". `threshold` sets or overrides the default
    threshold carried with the router.
    """
    path = os.fspath(path)
    if kind is not None:
        _check_kind(kind)
    if os.path.isdir(path):
        inner = os.path.join(path, FILE_NAME)
        if not os.path.exists(inner):
            raise CheckpointError(f"{path}: directory has no {FILE_NAME}")
        path = inner
    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of router parameters, found {type(obj).__name__}")

    meta = _safetensors_meta(path)
    if (meta is not None and meta.get("format") == FORMAT_NAME) or (
            "prob" in obj and isinstance(obj["prob"], np.ndarray) and obj["prob"].ndim == 2):
        router = _load_project(path, obj, kind, meta)
    else:
        if "routers" in obj:
            # The DiT training script's checkpoint: routers beside optimizer state and args.
            sub = obj["routers"]
            if not isinstance(sub, Mapping):
                raise CheckpointError(f"{path}: 'routers' is a {type(sub).__name__}, expected a dict of tensors")
            default_kind = "dit-ddim"
        else:
            sub = obj
            default_kind = "uvit-dpm2"
        prob = _rows_from_dict(strip_prefix(sub), path)
        try:
            router = Router(prob=prob, kind=kind or default_kind, source=path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
    if threshold is not None:
        router.threshold = float(threshold)
    return router


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def save_router(router: Router, path) -> str:
    """Writes the project format; `path` ending in .safetensors is the file, anything else a directory.

    Returns the file written.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, FILE_NAME)
    else:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": router.kind,
        "steps": str(router.steps),
        "num_units": str(router.num_units),
        "threshold": "" if router.threshold is None else repr(float(router.threshold)),
        "period": str(router.period),
        "forecast": router.forecast,
        "anchors": "" if router.anchors is None else ",".join(map(str, router.anchors)),
        "source": os.path.basename(router.source) if router.source else "",
    }
    tmp = path + ".tmp"
    tensors = {"prob": np.ascontiguousarray(router.prob, dtype=np.float32)}
    if router.coefs is not None:
        tensors["forecast_coefs"] = np.ascontiguousarray(router.coefs, dtype=np.float32)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)  # never leave a half-written router under the final name
    return path


def torch_state_dict(router: Router) -> dict:
    """The released PyTorch layout for the router's kind, as torch tensors.

    DiT: `{"routers": {"<i>.prob": tensor}}` (what `routers.load_state_dict(
    ckpt["routers"])` reads); U-ViT: `{"<i>.prob": tensor}`. Every row is its
    own tensor (own storage), like the original's per-step `Router` modules.
    """
    torch = require_torch()

    if router.period != 2 or router.anchors is not None or router.forecast != "copy":
        raise ConfigError(f"the released PyTorch layout holds L2C's period-2 copy routers; this one has period "
                          f"{router.period} with {router.forecast} forecasts (keep it in the project's format)")
    rows = {f"{i}.prob": torch.from_numpy(np.array(router.prob[i], dtype=np.float32, copy=True))
            for i in range(router.steps)}
    return {"routers": rows} if router.kind == "dit-ddim" else rows


def export_torch(router: Router, path) -> str:
    """torch.save of `torch_state_dict(router)`: plain tensors only, loadable with weights_only=True."""
    torch = require_torch()

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(torch_state_dict(router), tmp)
    os.replace(tmp, path)
    return path
