"""Errors the project raises on bad input.

Every user-facing failure is an `L2CError` whose message is one line that
says what is wrong and with which file or key; the command-line entry points
print that line to stderr and exit non-zero (see `l2c_jax.cli`).
"""

import math
import numbers


class L2CError(Exception):
    """Bad input: a checkpoint, a config or an argument that cannot be used."""


class CheckpointError(L2CError):
    """A checkpoint that is missing, unreadable, unsafe or does not match."""


class ConfigError(L2CError):
    """An invalid configuration or argument."""


def finite_number(name: str, value, *, low=None, high=None, low_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (or (low, high] with `low_open`), else a one-line ConfigError
    naming `name`: a NaN or inf knob poisons a run silently (NaN images, an untrained router)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    below = low is not None and (f <= low if low_open else f < low)
    if not math.isfinite(f) or below or (high is not None and f > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value!r}")
    return f


def whole_number(name: str, value, *, low: int = 1) -> int:
    """`value` as an int of at least `low`, else a one-line ConfigError naming `name` (a float depth or a
    negative count failed deep inside, as a reshape TypeError or a NumPy error)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be a whole number of at least {low}, got {value!r}")
    return int(value)


def check_architecture(kind: str, config, counts, zero_ok=(), divides=()) -> None:
    """A model config's own rules, checked when it is built (from config.json, a converter or a config):
    `counts` fields whole numbers >= 1 (`zero_ok` ones >= 0 or negative where the family allows), each
    (a, b) of `divides` with b % a == 0."""
    for f in counts:
        whole_number(f"{kind}.{f}", getattr(config, f), low=1)
    for f in zero_ok:
        v = getattr(config, f)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"{kind}.{f} must be a whole number, got {v!r}")
    for a, b in divides:
        va, vb = getattr(config, a), getattr(config, b)
        if vb % va:
            raise ConfigError(f"{kind}: {b} {vb} is not divisible by {a} {va}")
