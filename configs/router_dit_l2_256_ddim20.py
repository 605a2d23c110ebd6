"""Router training, the released setting for l2_256_ddim20 (see configs/router_dit.py)."""

from configs.router_dit import get_config as _base


def get_config(arg=None):
    return _base("l2_256_ddim20")
