"""Test setup: float32 matmuls at full precision (the parity tolerances assume it), and the shared fixtures.

The tiny reference models, their input/output records and routers are read
from ../shared/fixtures once per session (converting a checkpoint and jitting
its first call is the slow part of many tests). Modules name the family they
test with a module-level ``FAMILY = "dit"`` or ``"uvit"``; the ``io``,
``model`` and ``router`` fixtures then hand out that family's objects.
"""

import functools
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (l2c_jax is pip-installed)
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


def fixture_path(*parts):
    path = os.path.join(FIXTURES, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference fixture missing: {path} (../shared/fixtures must sit beside the checkout)")
    return path


def nhwc(a):
    """NCHW (the PyTorch fixtures) -> NHWC (this library)."""
    return np.asarray(a).transpose(0, 2, 3, 1)


def rel_err(a, ref):
    """Max abs error relative to the reference's scale (sampling chains amplify rounding; fixtures README)."""
    ref = np.asarray(ref)
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


# The tiny models were exported with 4 heads, which the weights alone do not reveal.
_FILES = {
    "dit": dict(io=("dit", "dit_tiny_io.npz"), model=("dit", "dit_tiny.pt"),
                router=("dit", "dit_tiny_router_ddim10.pt")),
    "uvit": dict(io=("uvit", "uvit_tiny_io.npz"), model=("uvit", "uvit_tiny.pth"),
                 conv_model=("uvit", "uvit_tiny_conv.pth"), router=("uvit", "uvit_tiny_router_dpm10.pth")),
}


def computed_units(sampler, schedule, noise, y):
    """(evaluations, units): which units each model evaluation really computed (`on_step`); a reused unit
    hands on its cached value bit for bit."""
    seen, prev = [], {}

    def on_step(s, units):
        cur = [np.asarray(u) for u in units]
        seen.append(np.ones(len(cur), bool) if not prev else
                    np.array([not np.array_equal(a, b) for a, b in zip(prev["u"], cur)]))
        prev["u"] = cur

    sampler(noise, y, schedule, on_step=on_step)
    return np.stack(seen)


@functools.cache
def reference_io(family):
    return dict(np.load(fixture_path(*_FILES[family]["io"])))


@functools.cache
def reference_model(family, which="model"):
    if family == "dit":
        from l2c_jax.convert.dit import convert_dit
        return convert_dit(fixture_path(*_FILES[family][which]), num_heads=4)
    from l2c_jax.convert.uvit import convert_uvit
    return convert_uvit(fixture_path(*_FILES[family][which]), num_heads=4)


@functools.cache
def reference_router(family):
    from l2c_jax.router import load_router
    return load_router(fixture_path(*_FILES[family]["router"]))


def _family(request):
    family = getattr(request.module, "FAMILY", None)
    if family not in _FILES:
        raise pytest.UsageError(f"{request.module.__name__} must set FAMILY to one of {sorted(_FILES)}")
    return family


@pytest.fixture
def fixtures():
    return fixture_path


@pytest.fixture(scope="module")
def io(request):
    return reference_io(_family(request))


@pytest.fixture(scope="module")
def model(request):
    return reference_model(_family(request))


@pytest.fixture(scope="module")
def conv_model(request):
    return reference_model(_family(request), "conv_model")


@pytest.fixture(scope="module")
def router(request):
    return reference_router(_family(request))
