"""Compile time of a whole L2C schedule, cold and warm, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from l2c_jax.bench.harness import bench_schedule, build_model, build_sampler, package_env, typed_model


def _compile_probe(spec: dict) -> dict:
    """Runs in a subprocess: compiles the L2C schedule's graphs for shapes only and times it."""
    t_start = time.perf_counter()
    import jax
    import ml_collections

    from l2c_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(spec["cache_dir"])
    config = ml_collections.ConfigDict(spec["config"])
    model = typed_model(build_model(config, abstract=True), config.get("dtype", "float32"))
    sampler = build_sampler(model, config, spec["strategy"])
    _, schedule = bench_schedule(config, model, sampler)
    t0 = time.perf_counter()
    stats = sampler.compile(int(spec["batch"]), schedule, workers=spec.get("workers") or None)
    wall = time.perf_counter() - t0
    return dict(compile_s=wall, graphs=stats["graphs"], workers=stats["workers"],
                per_graph_s=[round(x, 3) for x in stats["per_graph_s"]], trace_lower_s=stats["trace_lower_s"],
                process_s=time.perf_counter() - t_start, backend=jax.default_backend())


def _compile_probe_main():
    spec = json.loads(sys.stdin.read())
    print("L2C_COMPILE_PROBE " + json.dumps(_compile_probe(spec)), flush=True)


def measure_compile(config, strategy: str, batch: int, workers: int, cache_dir: Optional[str] = None) -> dict:
    """Cold and warm compile of the whole L2C schedule, each in a fresh process (same new cache dir)."""
    own = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="l2c_xla_cache_")
    spec = dict(config=config.to_dict(), strategy=strategy, batch=batch, workers=workers, cache_dir=cache_dir)
    env = package_env()
    out = {}
    for phase in ("cold", "warm"):
        r = subprocess.run([sys.executable, "-c", "from l2c_jax.bench.compile_probe import _compile_probe_main as m; m()"],
                           input=json.dumps(spec), capture_output=True, text=True, env=env)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("L2C_COMPILE_PROBE ")]
        if r.returncode != 0 or not line:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"compile probe ({phase}) failed: {tail[0]}")
        out[phase] = json.loads(line[0].split(" ", 1)[1])
    entries = sum(len(fs) for _, _, fs in os.walk(cache_dir))
    res = dict(cold_s=out["cold"]["compile_s"], warm_s=out["warm"]["compile_s"], graphs=out["cold"]["graphs"],
               workers=out["cold"]["workers"], cold_per_graph_s=out["cold"]["per_graph_s"],
               cold_process_s=out["cold"]["process_s"], warm_process_s=out["warm"]["process_s"],
               cold_trace_lower_s=out["cold"]["trace_lower_s"], warm_trace_lower_s=out["warm"]["trace_lower_s"],
               cache_entries=entries)
    if own:
        import shutil
        shutil.rmtree(cache_dir, ignore_errors=True)
    return res
