"""A schedule: the one thing samplers consume.

Per model evaluation (a row, in sampling order), which cacheable units
compute (True) and which reuse (False), and how a reused unit's value is
formed: copied, or forecast from its history (`forecast`: "copy", "taylor1",
"taylor2"; `l2c_jax.sampling.forecast` states the rule). Anchors are the
evaluations whose computes feed a forecast's history: a router's period
starts, else every row that computes all units.

Routers (threshold, period, forecast, retargeting, the check against the
model), the caching methods (`l2c_jax.methods`) and a user's own masks all
become a `Schedule`; routers through `from_router`, the one place a router's
masks are made for sampling. `l2c_jax.sampling.resolve_schedule` is the
single entry that turns what a caller gave (a method spec such as
"taylorseer:3/2", a router, masks) into one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

import numpy as np

from l2c_jax.errors import ConfigError, finite_number

FORECASTS = ("copy", "taylor1", "taylor2")


@dataclasses.dataclass
class Schedule:
    """masks: (rows, units) bool or None (every unit at every evaluation); forecast: how reused units are
    formed; anchors: (rows,) bool or None (the all-True rows). method / setting name it in reports; steps: the
    sampler steps it runs (None: the sampler's own); reference_steps: the full sampler's step count its computed
    share is counted against. coefficients: (rows, units, 2) learned forecast coefficients of d1 and d2 per
    evaluation and unit, in sampling order (a router's `coefs`); None: Taylor's own."""

    masks: Optional[np.ndarray] = None
    forecast: str = "copy"
    anchors: Optional[np.ndarray] = None
    method: str = "masks"
    setting: str = "-"
    steps: Optional[int] = None
    reference_steps: Optional[int] = None
    num_units: Optional[int] = None
    source: str = ""
    coefficients: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.forecast not in FORECASTS:
            raise ConfigError(f"unknown forecast {self.forecast!r} (known: {', '.join(FORECASTS)})")
        if self.masks is not None:
            m = np.asarray(self.masks)
            if m.ndim != 2:
                raise ConfigError(f"cache masks must be (model evaluations, units), got shape {m.shape}")
            self.masks = m.astype(bool)
            if self.num_units is None:
                self.num_units = int(m.shape[1])
        if self.anchors is not None:
            self.anchors = np.asarray(self.anchors, bool)
        if self.coefficients is not None:
            c = np.asarray(self.coefficients, np.float32)
            if self.masks is None or c.shape != self.masks.shape + (2,):
                raise ConfigError(f"forecast coefficients have shape {c.shape}, the schedule needs "
                                  f"{None if self.masks is None else self.masks.shape + (2,)}")
            self.coefficients = c
        self.setting = str(self.setting)

    @property
    def forecasts(self) -> bool:
        return self.masks is not None and self.forecast != "copy" and not self.masks.all()

    def anchor_rows(self) -> np.ndarray:
        """(rows,) bool: the evaluations whose computes feed a forecast's history."""
        if self.anchors is not None:
            return self.anchors
        return self.masks.all(1)

    def rows(self, default: int) -> int:
        return default if self.masks is None else int(self.masks.shape[0])

    def computed(self) -> int:
        """Computed unit evaluations."""
        if self.masks is None:
            return int(self.steps * self.num_units)
        return int(self.masks.sum())

    @property
    def computed_share(self) -> float:
        """Computed unit evaluations over the full reference sampler's."""
        steps = self.masks.shape[0] if self.masks is not None else self.steps
        ref = self.reference_steps or steps
        return self.computed() / float(ref * self.num_units)

    def key(self) -> tuple:
        """Hashable identity of what the sampler runs (masks, anchors, forecast)."""
        if self.masks is None:
            return (None, None, self.forecast)
        learned = None if self.coefficients is None else self.coefficients.tobytes()
        return (self.masks.shape, self.masks.tobytes(), self.anchor_rows().tobytes(), self.forecast, learned)

    def describe(self) -> str:
        return self.method if self.setting in ("-", "") else f"{self.method} {self.setting}"


def parse_spec(spec: str) -> Tuple[str, Optional[str]]:
    """"taylorseer:3/2" -> ("taylorseer", "3/2"); "l2c" -> ("l2c", None)."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty schedule: give a method, e.g. 'l2c', 'fora:3', 'taylorseer:3/2'")
    name, _, setting = spec.partition(":")
    return name.strip(), (setting.strip() or None)


def anchor_layout(spec, steps: int) -> np.ndarray:
    """(steps,) bool, sampling order: the anchors (evaluations that compute every unit and feed a forecast's
    history) a layout spec places among `steps` sampler steps.

    - N (an int, or "N"): every N-th step from the first (a cache period, FORA's interval);
    - "warpC^P[@L]": C anchors at round(L (i / (C-1))^P), i = 0..C-1 (L: the last anchor, steps-1 by
      default). P < 1 puts them closer together late in sampling, where each step changes the image most
      (docs/learned_forecasts.md measures why);
    - "s0,s1,...": these sampler steps (the first must be 0).
    """
    steps = int(steps)
    text = str(spec).strip()
    m = re.fullmatch(r"warp(\d+)\^([0-9.]+)(?:@(\d+))?", text)
    try:
        if m:
            count, power = int(m[1]), float(m[2])
            last = steps - 1 if m[3] is None else int(m[3])
            if count < 2 or not 0 < power or last < 1:
                raise ValueError
            if last >= steps or count > last + 1:
                raise ConfigError(f"anchor layout {text!r} does not fit {steps} steps")
            where = np.round(last * np.linspace(0.0, 1.0, count) ** power).astype(int)
            if len(np.unique(where)) != count:
                raise ConfigError(f"anchor layout {text!r}: {count} anchors up to step {last} collide at power "
                                  f"{power:g} (fewer anchors or a power nearer 1)")
        elif "," in text:
            where = np.asarray([int(v) for v in text.split(",") if v.strip()])
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            where = np.arange(0, steps, n)
    except ValueError:
        raise ConfigError(f"anchor layout {text!r}: expected N (every N-th step), warpC^P[@L] or a list "
                          f"of sampler steps such as 0,4,9") from None
    if len(where) == 0 or where[0] != 0 or (np.diff(where) <= 0).any():
        raise ConfigError(f"anchor layout {text!r}: the anchors must rise from step 0")
    if where[-1] >= steps:
        raise ConfigError(f"anchor layout {text!r}: step {where[-1]} does not fit {steps} steps")
    out = np.zeros(steps, bool)
    out[where] = True
    return out


def check_threshold(threshold) -> float:
    """A router threshold: a finite number in [0, 1] (sigmoid outputs are compared with it)."""
    return finite_number("router threshold", threshold, low=0.0, high=1.0)


def from_router(router, *, kind: str, num_units: int, rows: int, threshold=None, retarget: bool = False,
                skip_type: str = "time_uniform") -> Schedule:
    """The schedule a router gives a sampler whose routers have `rows` rows (DiT: DDIM steps; U-ViT: NFE) and
    a model of `num_units` units.

    Checks the router belongs to such a model (its kind, its columns) and step
    count, retargets it first when asked (`l2c_jax.retarget`), thresholds it (its
    own threshold by default) and carries its forecast and period: a period-k
    router's anchors are its period starts.
    """
    where = f"router {router.source}: " if getattr(router, "source", None) else ""
    if router.kind != kind:
        raise ConfigError(f"{where}a {router.kind} router cannot drive this model (it needs a {kind} router)")
    if router.num_units != num_units:
        raise ConfigError(f"{where}router has {router.num_units} columns, the model has {num_units} sub-layers")
    if retarget and router.steps != rows:
        from l2c_jax.retarget import retarget as retarget_router

        router = retarget_router(router, rows, skip_type)
    if router.steps != rows:
        raise ConfigError(f"{where}router was trained for {router.steps} steps, sampling uses {rows} (retarget it: "
                          f"--config.router.retarget=True, or convert/router.py --steps {rows})")
    if threshold is None:
        threshold = router.threshold
    if threshold is None:
        raise ConfigError("a router needs a threshold (the released DiT routers use 0.1, U-ViT 0.9)")
    masks = router.masks(check_threshold(threshold))
    anchors = coefficients = None
    if kind == "dit-ddim":
        anchors = router.anchor_rows()
    if router.coefs is not None:  # router rows are respaced indices: sampling order runs them backwards
        coefficients = router.coefs[[router._row_of_step(s) for s in range(masks.shape[0])]]
    return Schedule(masks=masks, forecast=router.forecast, anchors=anchors, method="l2c",
                    setting=f"{float(threshold):g}", num_units=num_units, source=router.source or "",
                    coefficients=coefficients)
