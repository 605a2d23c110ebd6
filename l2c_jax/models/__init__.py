"""Flax models with the per-sub-layer feature cache of Learning-to-Cache."""
