"""Benchmark of the user's path at full size: convert -> load -> compile -> sample -> decode (README figures).

  python scripts/benchmark.py --config configs/bench_user_path.py:dit      # DiT-XL/2 256 + SD-VAE + DDIM20_router.pt
  python scripts/benchmark.py --config configs/bench_user_path.py:uvit     # U-ViT-H/2 256 + autoencoder + dpm20_router.pth

Random weights written in the original PyTorch formats (under `workdir/source`,
kept for later runs), converted with the converters, sampled with
`scripts/sample.py` and the released router, each step a fresh process. The
router default is where the README puts the released files; the project's
fixtures hold copies (`../shared/fixtures/routers/`).
"""

import os

import ml_collections

_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures",
                         "routers")
_ROUTERS = {"dit": "DDIM20_router.pt", "uvit": "dpm20_router.pth"}


def get_config(arg="dit"):
    if arg not in _ROUTERS:
        raise ValueError(f"bench_user_path variants: {', '.join(_ROUTERS)}; got {arg!r}")
    c = ml_collections.ConfigDict()
    c.mode = "user_path"
    c.family = arg
    router = os.path.join("ckpt", _ROUTERS[arg])
    if not os.path.exists(router) and os.path.exists(os.path.join(_FIXTURES, _ROUTERS[arg])):
        router = os.path.normpath(os.path.join(_FIXTURES, _ROUTERS[arg]))
    c.router = router
    c.batch_size = 2
    c.repeats = 1  # timed runs after the first (compiling) one
    c.dtype = "float32"
    c.strategy = "auto"
    c.workdir = f"out/bench_user_path_{arg}"
    c.output = ""  # a JSON-lines file to append the row to
    return c
