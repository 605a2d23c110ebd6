"""Test setup: float32 matmuls at full precision (the parity tolerances assume it)."""

import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.path.join(os.path.dirname(ROOT), "shared", "fixtures")


def fixture_path(*parts):
    path = os.path.join(FIXTURES, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference fixture missing: {path} (../shared/fixtures must sit beside the checkout)")
    return path


@pytest.fixture
def fixtures():
    return fixture_path
