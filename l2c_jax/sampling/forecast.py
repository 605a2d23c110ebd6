"""The one forecaster: how a reused unit's value is formed, for the sampler and the router loss alike.

"copy" hands the model the unit's last value, as every cache method does.
"taylor1" / "taylor2" (TaylorSeer, Liu et al. 2025) forecast it from a Taylor
polynomial over sampler steps instead. The rule, one for both sampling and
training:

- **Anchors feed the history.** An anchor is a model evaluation whose computes
  re-estimate the derivative terms: a router's period starts, or, for other
  schedules, the evaluations that compute every unit (FORA's computed steps).
  At an anchor, by finite differences over anchors (dt: steps since the
  previous anchor),

      d1 = (v - v_prev) / dt,      d2 = (d1 - d1_prev) / dt

  d1 is known from the second anchor on, d2 from the third.
- **A reused unit advances its latest value.** With m the steps since the last
  anchor and F(m) = v + d1 m + d2 m^2 / 2, a reused unit is handed its value of
  the previous step plus the polynomial's change over this step:

      value_m = value_{m-1} + F(m) - F(m-1) = value_{m-1} + d1 + d2 (2m - 1) / 2

  (`shift_coefficients(m - 1, m)`). A unit not recomputed since the anchor so
  gets F(m) itself; one a cache step recomputed carries its fresh value forward
  along the polynomial. The cache holds every unit's latest value (computed or
  forecast); at the next anchor a unit's value at the previous anchor is taken
  back out of it (subtracting the increments added since), or, for a unit a
  cache step recomputed, from the history ("p", saved when it recomputed).

Pure functions (`derive`, `shift_coefficients`, `forecast_entry`) are what both
the sampler and the router loss (`l2c_jax.training.losses`, rolling a period
with soft weights) call. For sampling, `plan_forecast` reads the static
schedule once and says, per evaluation, which units are forecast with which
terms, where anchors update the history, and which history terms are alive
across each step boundary: a unit keeps a term only over the stretch in which
it will be read, only up to its order. `StepPlan`s are static (part of a
compiled step's key); the coefficients are device tables indexed by the step
inside the graph, so a schedule compiles one graph per distinct (mask, plan),
and the "cond" strategy one graph in all.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError
from l2c_jax.models.cache import Forecast

FORECASTS = ("copy", "taylor1", "taylor2")
TERMS = ("d1", "d2")


def check_forecast(forecast: Optional[str]) -> str:
    forecast = forecast or "copy"
    if forecast not in FORECASTS:
        raise ConfigError(f"unknown forecast {forecast!r} (known: {', '.join(FORECASTS)})")
    return forecast


def forecast_order(forecast: Optional[str]) -> int:
    """The Taylor order of a forecast: 0 (copy), 1 or 2."""
    return FORECASTS.index(check_forecast(forecast))


# --------------------------------------------------------------------------- the pure functions


def derive(value, previous, d1_old, dt, known1, known2):
    """The derivative terms an anchor estimates: (d1, d2) in float32 (None where not asked for).

    value: the unit's value at this anchor; previous: at the previous anchor;
    d1_old: the previous anchor's d1 (needed for d2; None: d2 not asked for);
    dt: steps between the anchors. known1 / known2: whether each term can be
    estimated yet (bools or traced 0/1 multipliers; an unknown term is 0).
    """
    # A division, not a product with 1/dt: XLA does not duplicate it into d2's computation, so d2 reads the
    # finished d1 and the sampler's buffers are updated in place rather than copied first (`sampling.dit`).
    d1 = known1 * ((value.astype(jnp.float32) - previous.astype(jnp.float32)) / dt)
    d2 = None if d1_old is None else known2 * ((d1 - d1_old.astype(jnp.float32)) / dt)
    return d1, d2


def shift_coefficients(m_from, m_to):
    """(a1, a2) with F(m_to) - F(m_from) = a1 d1 + a2 d2 for F(m) = v + d1 m + d2 m^2 / 2."""
    return m_to - m_from, (m_to * m_to - m_from * m_from) / 2


def forecast_entry(base, d1=None, d2=None, a1=None, a2=None) -> Forecast:
    """The cache entry of a reused unit: its base advanced by a1 d1 + a2 d2 (absent terms: none)."""
    terms, coeffs = [], []
    for t, c in ((d1, a1), (d2, a2)):
        if t is not None:
            terms.append(t)
            coeffs.append(c)
    return Forecast(base, tuple(terms), tuple(coeffs))


# --------------------------------------------------------------------------- the static plan


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one evaluation does with the history (hashable: part of a compiled step's key).

    reads: per unit, how many derivative terms its reuse adds (0: copy, or computed).
    anchor: whether this evaluation re-estimates the terms.
    derive: per unit, how many terms this anchor estimates (0 off anchors).
    prev_p: units whose previous-anchor value is held in the history ("p"),
    not in the incoming cache (a cache step recomputed them since).
    save_p: units whose previous-anchor value is taken out of the incoming cache
    into the history here, before this evaluation recomputes them.
    back: per unit, how many terms were added to its incoming cache value since
    its last compute (what taking the anchor value back out subtracts).
    hist_in / hist_out: the (term, unit) pairs alive before / after it.
    """

    reads: Tuple[int, ...]
    anchor: bool
    derive: Tuple[int, ...]
    prev_p: Tuple[int, ...]
    save_p: Tuple[int, ...]
    back: Tuple[int, ...]
    hist_in: Tuple[Tuple[str, int], ...]
    hist_out: Tuple[Tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class TracedPlan:
    """The "cond" strategy's plan: one history layout for every evaluation, the rest traced."""

    layout: Tuple[Tuple[str, int], ...]


@dataclasses.dataclass
class ForecastPlan:
    """A schedule's forecast, planned once: static step plans, coefficient tables, history size.

    coeffs: host float32 tables: (steps, units) a1 / a2 (this step's increment)
    and back1 / back2 (the increments the incoming cache value holds), (steps,)
    dt (steps since the previous anchor, at anchors; 1 elsewhere), and for the
    traced plan also anchor (steps,), derive1 / derive2 /
    prev_p / save_p (steps, units) as 0/1.
    """

    steps: Tuple[StepPlan, ...]
    coeffs: Dict[str, np.ndarray]
    order: int
    num_units: int
    cache_needed: Tuple[bool, ...]  # whether evaluation s reads its incoming cache

    def traced(self) -> TracedPlan:
        layout = sorted({k for s in self.steps for k in s.hist_in + s.hist_out})
        return TracedPlan(tuple(layout))


def plan_forecast(masks: np.ndarray, anchors: np.ndarray, order, coefficients=None) -> ForecastPlan:
    """Plans the forecast of a static schedule.

    masks: (steps, units) bool, True = compute; anchors: (steps,) bool, each an
    all-True row, the first row among them; order: 0, 1 or 2, for every unit or
    (units,) per unit. coefficients: (steps, units, 2) learned coefficients of
    d1 and d2 for each reuse's increment, in place of Taylor's (a router's
    learned forecast); None: Taylor's.
    """
    masks = np.asarray(masks, bool)
    anchors = np.asarray(anchors, bool)
    n_steps, n_units = masks.shape
    orders = np.broadcast_to(np.asarray(order, np.int64), (n_units,))
    if anchors.shape != (n_steps,) or not anchors[0]:
        raise ConfigError("a forecast needs the first evaluation to be an anchor (it computes every unit)")
    if not masks[anchors].all():
        bad = int(np.flatnonzero(anchors & ~masks.all(1))[0])
        raise ConfigError(f"evaluation {bad} is an anchor of the forecast but does not compute every unit")
    anchor_steps = np.flatnonzero(anchors)
    n_a = len(anchor_steps)
    n_anchors = np.cumsum(anchors)  # anchors at or before each step
    a_index = n_anchors - 1  # the stretch each step belongs to
    ends = np.append(anchor_steps[1:], n_steps)  # where each stretch ends (exclusive)

    # What each reuse reads and adds (its increment), and what the incoming cache value holds (back).
    reads = np.zeros((n_steps, n_units), np.int64)
    a1 = np.zeros((n_steps, n_units), np.float32)
    a2 = np.zeros((n_steps, n_units), np.float32)
    back1 = np.zeros((n_steps, n_units), np.float32)
    back2 = np.zeros((n_steps, n_units), np.float32)
    acc1, acc2 = np.zeros(n_units), np.zeros(n_units)
    for s in range(n_steps):
        back1[s], back2[s] = acc1, acc2
        known = min(2, int(n_anchors[s]) - 1)
        k = np.where(masks[s], 0, np.minimum(orders, known))
        reads[s] = k
        c1, c2 = shift_coefficients(float(s - anchor_steps[a_index[s]] - 1), float(s - anchor_steps[a_index[s]]))
        if coefficients is not None:
            c1, c2 = coefficients[s, :, 0], coefficients[s, :, 1]
        a1[s] = np.where(k >= 1, c1, 0.0)
        a2[s] = np.where(k >= 2, c2, 0.0)
        acc1, acc2 = np.where(masks[s], 0.0, acc1 + a1[s]), np.where(masks[s], 0.0, acc2 + a2[s])

    # Per stretch: the most any reuse in it reads, per unit; then what each anchor derives.
    need = np.zeros((n_a + 1, n_units), np.int64)
    for s in range(n_steps):
        need[a_index[s]] = np.maximum(need[a_index[s]], reads[s])
    derive_n = np.where(need[:n_a] >= 2, 2, np.where((need[:n_a] >= 1) | (need[1:] >= 2), 1, 0))
    derive_rows = np.zeros((n_steps, n_units), np.int64)
    derive_rows[anchor_steps] = derive_n

    # p: a unit recomputed by a cache step keeps its previous-anchor value in the history from that compute
    # until the next anchor, where it is needed for d1; the others' is taken back out of the cache there.
    save_p = np.zeros((n_steps, n_units), bool)
    prev_p = np.zeros((n_steps, n_units), bool)
    p_alive = np.zeros((n_steps, n_units), bool)  # after step s
    for a in range(1, n_a):
        start, end = anchor_steps[a - 1], anchor_steps[a]
        for u in np.flatnonzero(derive_n[a] >= 1):
            inner = np.flatnonzero(masks[start + 1:end, u])
            if inner.size:
                c = start + 1 + int(inner[0])
                save_p[c, u] = True
                prev_p[end, u] = True
                p_alive[c:end, u] = True
    # Where the incoming cache value's increments are taken back out (an anchor's previous value, a p saved).
    rebuild = save_p | ((derive_rows >= 1) & ~prev_p)
    uses = {"d1": rebuild & (back1 != 0), "d2": rebuild & (back2 != 0)}
    back_n = np.where(uses["d2"], 2, np.where(uses["d1"], 1, 0))

    # Which terms are alive after each step: the current stretch's d1 / d2 while a later step of the stretch
    # reads them (a forecast, or a p taken out), or the next anchor does (its d2, or its previous value).
    alive = {t: np.zeros((n_steps, n_units), bool) for t in TERMS}
    for s in range(n_steps):
        a, end = a_index[s], ends[a_index[s]]
        later = slice(s + 1, end)
        nxt = end if end < n_steps else None
        for t, level in (("d1", 1), ("d2", 2)):
            read_later = (reads[later] >= level).any(0) | (uses[t][later]).any(0)
            at_next = uses[t][nxt] if nxt is not None else np.zeros(n_units, bool)
            if t == "d1" and nxt is not None:
                at_next = at_next | (derive_rows[nxt] >= 2)
            alive[t][s] = (derive_n[a] >= level) & (read_later | at_next)

    def layout(s):
        if s < 0:
            return ()
        keys = [(t, int(u)) for t in TERMS for u in np.flatnonzero(alive[t][s])]
        keys += [("p", int(u)) for u in np.flatnonzero(p_alive[s])]
        return tuple(sorted(keys))

    dt = np.ones(n_steps, np.float32)
    dt[anchor_steps[1:]] = np.diff(anchor_steps).astype(np.float32)
    steps = tuple(StepPlan(reads=tuple(int(r) for r in reads[s]), anchor=bool(anchors[s]),
                           derive=tuple(int(d) for d in derive_rows[s]),
                           prev_p=tuple(int(u) for u in np.flatnonzero(prev_p[s])),
                           save_p=tuple(int(u) for u in np.flatnonzero(save_p[s])),
                           back=tuple(int(b) for b in back_n[s]),
                           hist_in=layout(s - 1), hist_out=layout(s)) for s in range(n_steps))
    cache_needed = (~masks).any(1) | rebuild.any(1)
    cache_needed[0] = False
    coeffs = dict(a1=a1, a2=a2, back1=back1, back2=back2, dt=dt, anchor=anchors.astype(np.float32),
                  derive1=(derive_rows >= 1).astype(np.float32), derive2=(derive_rows >= 2).astype(np.float32),
                  prev_p=prev_p.astype(np.float32), save_p=save_p.astype(np.float32))
    return ForecastPlan(steps, coeffs, int(orders.max()) if n_units else 0, n_units,
                        tuple(bool(c) for c in cache_needed))


# --------------------------------------------------------------------------- inside a compiled step


def step_entries(plan, cache, hist, coef, s):
    """The cache entries evaluation s hands the model: plain values, or `Forecast`s for the units it forecasts.

    plan: a `StepPlan` (static) or a `TracedPlan` ("cond": every unit holding
    terms gets a Forecast whose increment is 0 where it does not forecast).
    cache: the incoming cache (a tuple, in the computation dtype); hist: the
    history dict {(term, unit): array}; coef: the device coefficient tables.
    """
    if cache is None:
        return None
    a1, a2 = coef["a1"][s], coef["a2"][s]
    out = list(cache)
    for u in range(len(cache)):
        if isinstance(plan, StepPlan):
            k = plan.reads[u]
        else:
            k = 2 if ("d2", u) in hist else int(("d1", u) in hist)
        if not k:
            continue
        out[u] = forecast_entry(cache[u], hist[("d1", u)], hist[("d2", u)] if k >= 2 else None,
                                a1[u], a2[u] if k >= 2 else None)
        if not isinstance(plan, StepPlan):
            # "cond": formed before the unit's conditional (0 increments where it computes), which then only
            # picks a plain value: a forecast inside the branch copies its operands on XLA's CPU backend.
            out[u] = out[u].value(cache[u].dtype)
    return tuple(out)


def _anchor_value(cache_value, hist, u, k, b1, b2):
    """A unit's value at the last anchor, taken back out of its latest value: minus the k terms' increments."""
    entry = forecast_entry(cache_value, hist[("d1", u)] if k >= 1 else None, hist[("d2", u)] if k >= 2 else None,
                           -b1, -b2)
    return entry.value(jnp.float32)


def step_history(plan, cache_in, values, hist, coef, s, dtype):
    """The history after evaluation s: anchors derive their terms from `values` (what the units computed),
    a p is taken out of the incoming cache where a cache step recomputes its unit, and terms no later
    evaluation reads are dropped.

    dtype: the history's storage dtype (d1, d2); p keeps the cache's own.
    """
    dt, b1, b2 = coef["dt"][s], coef["back1"][s], coef["back2"][s]
    if isinstance(plan, StepPlan):
        fresh = {}
        for u in plan.save_p:
            fresh[("p", u)] = _anchor_value(cache_in[u], hist, u, plan.back[u], b1[u], b2[u]).astype(cache_in[u].dtype)
        if plan.anchor:
            for u, k in enumerate(plan.derive):
                if not k:
                    continue
                if u in plan.prev_p:
                    prev = hist[("p", u)]
                else:
                    prev = _anchor_value(cache_in[u], hist, u, plan.back[u], b1[u], b2[u])
                d1, d2 = derive(values[u], prev, hist[("d1", u)] if k >= 2 else None, dt, 1.0, 1.0)
                fresh[("d1", u)] = d1.astype(dtype)
                if d2 is not None:
                    fresh[("d2", u)] = d2.astype(dtype)
        return {key: fresh[key] if key in fresh else hist[key] for key in plan.hist_out}

    # Traced: one layout; anchors (a traced flag) derive every unit the table says, p where it says.
    anchor = coef["anchor"][s] > 0
    k1, k2 = coef["derive1"][s], coef["derive2"][s]
    prev_p, save_p = coef["prev_p"][s], coef["save_p"][s]
    layout = set(plan.layout)

    def terms_of(u):
        return 2 if ("d2", u) in layout else int(("d1", u) in layout)

    def at_anchor(h):
        out = {}
        for term, u in plan.layout:
            if term != "d1":
                continue
            prev = _anchor_value(cache_in[u], h, u, terms_of(u), b1[u], b2[u])
            if ("p", u) in layout:
                prev = jnp.where(prev_p[u] > 0, h[("p", u)].astype(jnp.float32), prev)
            d1, d2 = derive(values[u], prev, h[("d1", u)] if ("d2", u) in layout else None, dt, k1[u], k2[u])
            out[("d1", u)] = d1.astype(dtype)
            if d2 is not None:
                out[("d2", u)] = d2.astype(dtype)
        return out

    d_keys = [k for k in plan.layout if k[0] in TERMS]
    new = dict(jax.lax.cond(anchor, at_anchor, lambda h: {k: h[k] for k in d_keys}, hist))
    for term, u in plan.layout:
        if term == "p":
            taken = _anchor_value(cache_in[u], hist, u, terms_of(u), b1[u], b2[u]).astype(hist[(term, u)].dtype)
            new[(term, u)] = jnp.where(save_p[u] > 0, taken, hist[(term, u)])
    return new


def history_bytes(plan: Optional[ForecastPlan], unit_shape: Sequence[int], history_dtype, cache_dtype,
                  traced: bool = False) -> Dict[str, int]:
    """Bytes of history a run keeps at its peak (across any step boundary; "cond": its fixed layout), beside
    what keeping (value, d1, d2) in float32 for every unit would take (0 for schedules that only copy)."""
    if plan is None or plan.order == 0:
        return dict(kept=0, all_units=0)
    per = int(np.prod(unit_shape))
    hd, cd = np.dtype(history_dtype).itemsize, np.dtype(cache_dtype).itemsize

    def size(keys):
        return sum(per * (cd if t == "p" else hd) for t, _ in keys)

    layouts = [plan.traced().layout] if traced else [st.hist_out for st in plan.steps]
    return dict(kept=int(max(size(k) for k in layouts)), all_units=3 * plan.num_units * per * 4)
