"""Memory stays flat in the number of sampler steps, on the user's path (converted checkpoint -> load_model).

A DiT at XL width (1152, 16 heads, 256 tokens) and depth 4 (~0.45 GB of float32
weights) is written as the converter writes it (NumPy parameters through
`Model.save`), then loaded and sampled in fresh processes with 2 and with 20
steps. Weights restored as host arrays were copied to the device by every
jitted step and the copies piled up (about one weights copy per step); now the
peak may differ by no more than MARGIN between the two.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

MARGIN = 150 * 2**20  # bytes; a weights copy is ~450 MB, the activations of a step ~10 MB

_CHILD = r"""
import json, resource, sys
import numpy as np
import l2c_jax
directory, steps, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = l2c_jax.load_model(directory)
units = model.num_units
masks = np.ones((steps, units), bool)
masks[1::2, ::2] = False          # every other step reuses every attention output
rng = np.random.default_rng(0)
noise = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
out = l2c_jax.sample(model, noise, np.array([3]), steps=steps, masks=masks, strategy=strategy)
assert np.isfinite(np.asarray(out)).all()
print("PEAK " + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


@pytest.fixture(scope="module")
def xl_width_checkpoint(tmp_path_factory):
    import jax

    from l2c_jax.model import Model
    from l2c_jax.models.dit import DiTConfig

    cfg = DiTConfig(input_size=32, hidden_size=1152, depth=4, num_heads=16)
    model = Model.random("dit", cfg, seed=0)
    host = jax.tree.map(np.asarray, model.params)  # the converter holds NumPy arrays
    directory = str(tmp_path_factory.mktemp("xl_width") / "dit")
    Model("dit", cfg, host).save(directory)
    return directory


def _peak(directory, steps, strategy):
    env = dict(os.environ, PYTHONPATH=ROOT, L2C_JAX_CACHE_DIR="", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", _CHILD, directory, str(steps), strategy], capture_output=True,
                       text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.split("PEAK ")[-1])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["static", "cond"])
def test_peak_memory_does_not_grow_with_steps(xl_width_checkpoint, strategy):
    short = _peak(xl_width_checkpoint, 2, strategy)
    long = _peak(xl_width_checkpoint, 20, strategy)
    assert long - short < MARGIN, f"peak RSS {short / 2**30:.2f} GiB at 2 steps, {long / 2**30:.2f} GiB at 20"


_HEAP = r"""
import sys
import numpy as np
from l2c_jax import memory
how = sys.argv[1]
if how == "bound":
    assert memory.bound_heap_retention()
if how in ("large", "small"):
    memory.bound_large_models()                 # what cli.run_main does for a console command
if how in ("large", "small", "unasked"):
    memory.weights_restored(2**31 if how != "small" else 2**27)  # what checkpoint.restore_params reports
n = 20 * 2**20 // 8
x = np.ones(n); del x            # glibc (left alone) raises its mmap threshold past 20 MiB here
a, b = np.ones(n), np.ones(n)    # ... so these two come from the heap, b above a
before = memory.rss_bytes()
del a                            # a's pages sit below b: the heap cannot give them back
print("FREED", (before - memory.rss_bytes()) / 2**20)
"""


@pytest.mark.parametrize("how,bound", [("bound", True), ("default", False), ("large", True), ("small", False),
                                       ("unasked", False)])
def test_freed_large_buffers_go_back_once_a_console_command_restores_a_large_model(how, bound):
    """A freed 20 MiB buffer (an XLA buffer at DiT-XL/2 size) leaves the process at once under the heap
    bound, where glibc's moving threshold kept it resident. Console commands (`bound_large_models`)
    get the bound from the first restore of 1 GiB of weights or more: not for the digits DiT, whose
    fresh buffers would each cost page faults, nor for a process that imports the library and did
    not ask."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the heap bound is glibc's mallopt")
    p = subprocess.run([sys.executable, "-c", _HEAP, how], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    freed = float(p.stdout.split("FREED ")[-1])
    assert (freed > 15) if bound else (freed < 5), freed
