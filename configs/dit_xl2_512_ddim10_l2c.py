"""DiT-XL/2 at 512 px, DDIM 10, CFG 4.0, with the learned cache."""

from configs.dit_sample import get_config as _base


def get_config(arg=None):
    return _base("xl2_512_ddim10_l2c")
