"""The package's import structure: no cycles (imports inside functions count), and the model and
diffusion layers know nothing of the layers built on them."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = "l2c_jax"
# Layers a module of models/ or diffusion/ must not import (../shared/DESIGN.md).
HIGHER = ("l2c_jax.sampling", "l2c_jax.training", "l2c_jax.bench", "l2c_jax.pipelines", "l2c_jax.commands",
          "l2c_jax.configs",
          "l2c_jax.model", "l2c_jax.vae")


def _modules():
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def _imports(name, path, known):
    """Package modules `name` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([mod] if mod else []))
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            # the deepest package module this name refers to
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name:
                found.add(c)
    return found


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _is_package_init_edge(a, b):
    # `import l2c_jax.x.y` runs l2c_jax/__init__ and l2c_jax/x/__init__ first; a package's own
    # __init__ re-exporting its submodules is not a dependency of theirs on it.
    return b == a.rpartition(".")[0] or a.startswith(b + ".")


def test_no_import_cycles():
    graph = _graph()
    edges = {a: {b for b in bs if not _is_package_init_edge(a, b)} for a, bs in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_model_and_diffusion_layers_import_nothing_above_them():
    bad = []
    for mod, deps in _graph().items():
        if mod.startswith(("l2c_jax.models", "l2c_jax.diffusion")):
            bad += [f"{mod} -> {d}" for d in deps if any(d == h or d.startswith(h + ".") for h in HIGHER)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_imports():
    # the walk must see imports inside functions, or the two tests above could not fail
    deps = _graph()["l2c_jax.convert.dit"]
    assert "l2c_jax.convert.rules" in deps and "l2c_jax.model" in deps


@pytest.mark.slow
def test_import_sampling_and_conversion_load_no_tensorflow():
    router = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "routers", "DDIM20_router.pt")
    code = ("import sys, numpy as np, l2c_jax\n"
            "from l2c_jax.models.dit import DiTConfig\n"
            "m = l2c_jax.Model.random('dit', DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2,"
            " num_classes=4))\n"
            "l2c_jax.sample(m, np.zeros((1, 8, 8, 4), np.float32), np.array([1]), steps=2)\n"
            "import l2c_jax.convert.dit, l2c_jax.convert.uvit, l2c_jax.convert.vae\n"
            "from l2c_jax.commands import convert_router\n"
            f"convert_router.main(['--checkpoint', {router!r}, '--summary', '--threshold', '0.1'])\n"
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
            "print('LOADED ' + ' '.join(bad) if bad else 'NO_TF')\n")
    env = dict(os.environ, L2C_JAX_CACHE_DIR="")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "cache steps compute" in p.stdout
    assert p.stdout.strip().endswith("NO_TF"), p.stdout[-500:]
