"""U-ViT-H/2 at 256 px, DPM-Solver-2 with NFE 20, CFG 0.4."""

from configs.uvit_sample import get_config as _base


def get_config(arg=None):
    return _base("h2_256_nfe20")
