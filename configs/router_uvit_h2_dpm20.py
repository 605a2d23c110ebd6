"""Router training, the released setting for U-ViT-H/2 256 at NFE 20 (see configs/router_uvit.py)."""

from configs.router_uvit import get_config as _base


def get_config(arg=None):
    return _base("h2_256_dpm20")
