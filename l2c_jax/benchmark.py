"""`scripts/benchmark.py`: latency, compile time, memory and FLOP bound of DiT sampling with L2C.

One run of `run_benchmark(config)` measures, for one batch size, precision and
execution strategy (`l2c_jax.models.dit_scan`):

- latency per batch of the full schedule and of the L2C schedule: warm-up
  runs excluded, then `repeats` timed runs of each, interleaved (full, L2C,
  L2C, full, ...) so a drifting machine load biases neither; median, min, max;
- the FLOP bound of the schedule: total attention + MLP FLOPs of the full
  schedule over those the masks keep, each unit weighted by its own FLOPs
  (`flop_bound`; the always-computed embedders, adaLN and final layer are
  reported apart, in `bound_with_fixed`), and measured speed-up / bound;
- compile time of the whole L2C schedule: cold (a fresh process, an empty
  persistent compilation cache) and warm (a second fresh process reading the
  cache the first one wrote), each in its own subprocess, plus the
  ahead-of-time compile of the measuring process itself;
- peak memory: resident set size of the process, sampled while sampling (CPU),
  or the device's peak bytes in use when the backend reports it;
- with dtype bfloat16, the deviation of the L2C latents from float32 ones;
- optionally the original PyTorch L2C code on the same weights
  (`torch_reference`), timed the same way;
- the achieved FLOP rate of both schedules (and MFU where the chip's peak is
  known, `l2c_jax.throughput`).

`mode="forward"` times one full-model forward instead (FLOP rate, MFU, and a
matmul chain of the same shape as the device's practical ceiling):
`l2c_jax.throughput.run_forward_benchmark`.

It prints the measured speed-up, the bound and their ratio, and appends one
JSON row to `config.output`.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from l2c_jax.memory import RSSPeak, device_peak_bytes, maxrss_bytes

from l2c_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keys every JSON row has (tests check them; values may be None when not measured).
ROW_KEYS = (
    "name", "date", "command", "machine", "model", "image_size", "steps", "schedule_steps", "batch_size",
    "cfg_scale", "dtype", "strategy", "router", "threshold", "warmup", "repeats", "computed_share",
    "flop_bound", "bound_with_fixed", "full", "l2c", "speedup", "speedup_over_bound", "compile",
    "memory", "l2c_vs_full_rel", "bf16_vs_f32", "torch_reference", "throughput",
)


# --------------------------------------------------------------------------- FLOPs
def unit_flops(config, rows: int = 1) -> np.ndarray:
    """FLOPs of each cacheable unit for one forward of `rows` sequences, (2*depth,).

    Attention: qkv and output projections + scores (q k^T) + weighted values;
    MLP: fc1 + fc2. A multiply-add counts 2; softmax, norms and biases are not counted.
    """
    n = (config.input_size // config.patch_size) ** 2
    h = config.hidden_size
    attn = 2 * n * h * 3 * h + 2 * n * n * h + 2 * n * n * h + 2 * n * h * h
    mlp = 2 * 2 * n * h * int(h * config.mlp_ratio)
    return np.tile(np.array([attn, mlp], np.float64) * rows, config.depth)


def fixed_flops(config, rows: int = 1) -> float:
    """FLOPs every forward computes whatever the mask: patch embedding, timestep MLP, adaLN, final layer."""
    n = (config.input_size // config.patch_size) ** 2
    h, p = config.hidden_size, config.patch_size
    patch = 2 * n * p * p * config.in_channels * h
    temb = 2 * (256 * h + h * h)
    adaln = config.depth * 2 * h * 6 * h
    final = 2 * h * 2 * h + 2 * n * h * p * p * config.out_channels
    return float(rows * (patch + temb + adaln + final))


def flop_bound(config, masks, steps: int) -> dict:
    """Speed-up the schedule allows: full FLOPs / kept FLOPs over all `steps` steps.

    masks: None (no cache) or (steps, 2*depth) bools, True = computed.
    `bound` counts the cacheable units only (the issue's "share of transformer
    FLOPs that the masks keep"); `bound_with_fixed` adds the always-computed parts.
    """
    u = unit_flops(config)
    full_units = steps * u.sum()
    kept_units = full_units if masks is None else float((np.asarray(masks, bool) * u).sum())
    fixed = steps * fixed_flops(config)
    return dict(bound=full_units / kept_units, bound_with_fixed=(full_units + fixed) / (kept_units + fixed),
                unit_flops_full=full_units, unit_flops_kept=kept_units, fixed_flops=fixed,
                flop_share_kept=kept_units / full_units)


# --------------------------------------------------------------------------- machine and timing helpers
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import jax
    import jaxlib

    devs = jax.local_devices()
    info = dict(cpu=_cpu_model(), cores=os.cpu_count(), backend=jax.default_backend(),
                devices=[d.device_kind for d in devs], python=platform.python_version(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, platform=platform.platform())
    try:
        import flax
        info["flax"] = flax.__version__
    except Exception:
        pass
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def summarize(times, cpu=None) -> dict:
    t = [float(x) for x in times]
    out = dict(n=len(t), times=[round(x, 4) for x in t])
    if t:
        out.update(median=statistics.median(t), min=min(t), max=max(t), mean=statistics.fmean(t),
                   spread=(max(t) - min(t)) / statistics.median(t) if statistics.median(t) > 0 else 0.0)
    if cpu:
        # process CPU seconds / (wall * cores): well below 1 means the run waited (e.g. for other load).
        cores = os.cpu_count() or 1
        out["cpu_utilization"] = [round(c / (w * cores), 3) for c, w in zip(cpu, t) if w > 0]
        out["cpu_s"] = [round(float(c), 2) for c in cpu]
        out["cpu_s_median"] = statistics.median(float(c) for c in cpu)
    return out


def _rel(a, b) -> Optional[float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.abs(b).max()
    return float(np.abs(a - b).max() / den) if den > 0 else None


def _rel_rms(a, b) -> Optional[float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.sqrt(np.mean(b * b))
    return float(np.sqrt(np.mean((a - b) ** 2)) / den) if den > 0 else None


# --------------------------------------------------------------------------- model, router, samplers
def model_config(config):
    """The DiTConfig a benchmark config names: `model.arch` (dict) or `model.name` + `model.input_size`."""
    from l2c_jax.models.dit import DiTConfig

    mc = config.model
    arch = mc.get("arch")
    if arch:
        return DiTConfig(**(arch.to_dict() if hasattr(arch, "to_dict") else dict(arch)))
    return DiTConfig.from_name(mc.get("name", "DiT-XL/2"), input_size=int(mc.get("input_size", 32)))


def build_model(config, abstract: bool = False):
    """A float32 `Model`: converted (`model.checkpoint`) or random (`model.random_init`); abstract = shapes only."""
    from l2c_jax.model import Model, abstract_params, load_model

    mc = config.model
    if mc.get("checkpoint") and not mc.get("random_init", False):
        if abstract:
            from l2c_jax import checkpoint as ck
            from l2c_jax.model import family_of
            meta = ck.read_model_meta(mc.checkpoint)
            cfg = family_of(meta["family"])[0](**meta["config"])
            return Model(meta["family"], cfg, abstract_params(meta["family"], cfg))
        return load_model(mc.checkpoint)
    cfg = model_config(config)
    if abstract:
        return Model("dit", cfg, abstract_params("dit", cfg))
    return Model.random("dit", cfg, int(mc.get("init_seed", 0)))


def load_bench_router(config, model, steps: int):
    """(Router or None, masks or None): `router.checkpoint` = a file, "random" (seeded), or "" (no L2C)."""
    from l2c_jax.router import Router, load_router
    from l2c_jax.sampling import router_masks

    rc = config.get("router")
    if rc is None or not rc.get("checkpoint"):
        return None, None
    if rc.checkpoint == "random":
        rng = np.random.default_rng(int(rc.get("seed", 0)))
        router = Router(rng.normal(0.0, 2.0, size=(steps, model.num_units)).astype(np.float32), "dit-ddim",
                        threshold=rc.get("threshold"), source="random")
    else:
        router = load_router(rc.checkpoint, kind=rc.get("kind") or None)
    return router, router_masks(model, router, rc.get("threshold"), steps)


def typed_model(model, dtype):
    """The model computing in `dtype`; for bfloat16 its parameters are stored in bfloat16 too."""
    import jax.numpy as jnp
    from l2c_jax.model import Model
    from l2c_jax.models.dit_scan import cast_floating

    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return model
    return Model(model.family, model.config, cast_floating(model.params, dtype), dtype=dtype)


def resolve_strategy(name: str) -> str:
    from l2c_jax.models.dit_scan import STRATEGIES, default_strategy

    if name in ("", "auto", None):
        return default_strategy()
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} (known: auto, {', '.join(STRATEGIES)})")
    return name


def build_sampler(model, config, strategy: str):
    from l2c_jax.models.dit_scan import make_sampler

    sc = config.sampler
    return make_sampler(model, int(sc.steps), strategy, solver=sc.get("name", "ddim"),
                        cfg_scale=sc.get("cfg_scale"), eta=sc.get("eta", 0.0),
                        guidance_channels=sc.get("guidance_channels", 3),
                        unroll=int(config.get("scan_unroll", 1)))


def run_steps(sampler, noise, y, masks, max_steps: int = 0):
    """`sampler(noise, y, masks)`, or only its first `max_steps` steps (the same step functions)."""
    return sampler(noise, y, masks, max_steps=max_steps)


def _inputs(config, model, batch: int):
    import jax

    cfg = model.config
    key = jax.random.key(int(config.get("seed", 0)))
    noise = jax.random.normal(key, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
    labels = list(config.get("labels") or (0,))
    y = np.resize(np.asarray(labels, np.int64) % cfg.num_classes, batch).astype(np.int32)
    return noise, y


# --------------------------------------------------------------------------- compile time in fresh processes
def _compile_probe(spec: dict) -> dict:
    """Runs in a subprocess: compiles the L2C schedule's graphs for shapes only and times it."""
    t_start = time.perf_counter()
    import jax
    import ml_collections

    from l2c_jax.compile_cache import enable_compilation_cache

    enable_compilation_cache(spec["cache_dir"])
    config = ml_collections.ConfigDict(spec["config"])
    model = typed_model(build_model(config, abstract=True), config.get("dtype", "float32"))
    steps = int(config.sampler.steps)
    _, masks = load_bench_router(config, model, steps)
    sampler = build_sampler(model, config, spec["strategy"])
    t0 = time.perf_counter()
    stats = sampler.compile(int(spec["batch"]), masks, workers=spec.get("workers") or None)
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
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = {}
    for phase in ("cold", "warm"):
        r = subprocess.run([sys.executable, "-c", "from l2c_jax.benchmark import _compile_probe_main as m; m()"],
                           input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT, env=env)
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


# --------------------------------------------------------------------------- the original PyTorch code
def _import_original(path: str):
    """Imports the original DiT code from a checkout of its DiT folder (models/, diffusion/)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "models", "dynamic_models.py")):
        raise ConfigError(f"torch_reference={path} is not the original DiT folder (no models/dynamic_models.py)")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ModuleNotFoundError as e:
        raise ConfigError(f"the original DiT code needs timm ({e}); pip install timm (measurement only)") from None
    except RuntimeError as e:
        # A torchvision wheel built for another torch variant registers fake kernels for its
        # C++ ops unconditionally; timm only imports it for layers DiT does not use.
        # Declaring the two operators lets that import finish (nothing ever calls them).
        if "torchvision::" not in str(e):
            raise
        import torch
        for mod in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass
        _import_original._keep = lib
        import timm.models.vision_transformer  # noqa: F401
    from diffusion import create_diffusion
    from models import dynamic_models, models
    return models, dynamic_models, create_diffusion


def torch_reference(config, model, router, noise, y, steps: int, warmup: int, repeats: int,
                    report: Callable = print) -> dict:
    """Times the original's `ddim_sample_loop(model.forward_with_cfg, ...)`, full (`models.DiT`) and
    L2C (`dynamic_models.DiT` + `load_ranking`), on this model's weights, float32, CPU."""
    import torch

    from l2c_jax.convert.dit import state_dict_of

    threads = int(config.get("torch_threads", 2))
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    models, dynamic_models, create_diffusion = _import_original(config.torch_reference)
    cfg = model.config
    sd = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict_of(model.params).items()}
    kw = dict(input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
              hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
              class_dropout_prob=cfg.class_dropout_prob, num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma)
    diffusion = create_diffusion(str(steps))
    z = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    z = torch.cat([z, z], 0)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    yt = torch.cat([yt, torch.full_like(yt, cfg.null_class)], 0)
    cfg_scale = float(config.sampler.cfg_scale)
    out = dict(threads=threads, torch=torch.__version__, path=os.path.abspath(config.torch_reference))

    def run(m, kind):
        times, cpu, lat = [], [], None
        for _ in range(warmup):  # warm-up forwards (one-time kernel and thread-pool set-up), untimed
            if kind == "l2c":
                m.reset(steps)
            m.forward_with_cfg(z, torch.full((z.shape[0],), int(diffusion.timestep_map[-1])), yt, cfg_scale)
            report(f"  torch {kind}: warm-up forward done")
        for r in range(repeats):
            if kind == "l2c":
                m.reset(steps)  # the dynamic model counts steps down from here (full / cache by parity)
            t0, c0 = time.perf_counter(), time.process_time()
            lat = diffusion.ddim_sample_loop(m.forward_with_cfg, z.shape, z, clip_denoised=False,
                                             model_kwargs=dict(y=yt, cfg_scale=cfg_scale), progress=False,
                                             device="cpu")
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times.append(dt), cpu.append(dc)
            report(f"  torch {kind} run {r + 1}/{repeats}: {dt:.2f} s")
        return summarize(times, cpu), lat[: len(lat) // 2].numpy().transpose(0, 2, 3, 1)

    with torch.inference_mode():
        m = models.DiT(**kw).eval()
        m.load_state_dict(sd)
        out["full"], full_lat = run(m, "full")
        del m
        lat = None
        if router is not None:
            # The released files pickle an argparse.Namespace, which torch.load (weights_only)
            # refuses; the same rows are exported as plain tensors for `load_ranking`.
            from l2c_jax.router import export_torch
            tmp = tempfile.mkdtemp(prefix="l2c_router_")
            rpath = export_torch(router, os.path.join(tmp, "router.pt"))
            m = dynamic_models.DiT(**kw).eval()
            with contextlib.redirect_stdout(io.StringIO()):
                m.load_ranking(rpath, steps, diffusion.timestep_map, float(config.router.threshold))
            m.load_state_dict(sd)
            out["l2c"], lat = run(m, "l2c")
            del m
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            out["speedup"] = out["full"]["median"] / out["l2c"]["median"]
    return out, full_lat, lat


# --------------------------------------------------------------------------- the benchmark
def compilation_cache_of(config) -> Optional[str]:
    """Turns on the persistent compilation cache `config.compilation_cache_dir` names ("default", "off", a path)."""
    from l2c_jax.compile_cache import from_setting

    return from_setting(config.get("compilation_cache_dir", "default"))


def dtype_of(config, default: str = "float32"):
    import jax.numpy as jnp

    dtype = jnp.dtype(config.get("dtype", default))
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def run_benchmark(config, report: Callable = print, argv=None) -> dict:
    """Measures one (batch size, dtype, strategy) point; returns the JSON row (also appended to config.output)."""
    import jax
    import jax.numpy as jnp

    mode = config.get("mode", "sample")
    if mode == "forward":
        from l2c_jax.throughput import run_forward_benchmark
        return run_forward_benchmark(config, report, argv)
    if mode == "user_path":
        from l2c_jax.bench.user_path import run_user_path
        return run_user_path(config, report)
    if mode != "sample":
        raise ConfigError(f"mode must be 'sample' (full vs L2C schedules) or 'forward' (MFU), got {mode!r}")
    cache_dir = compilation_cache_of(config)
    strategy = resolve_strategy(config.get("strategy", "auto"))
    dtype = dtype_of(config)
    batch = int(config.batch_size)
    steps = int(config.sampler.steps)
    max_steps = int(config.get("max_steps", 0) or 0)
    sched_steps = min(max_steps, steps) if max_steps else steps
    warmup, repeats = int(config.get("warmup", 1)), int(config.get("repeats", 2))
    workers = int(config.get("compile_workers", 0) or 0) or (os.cpu_count() or 1)
    if repeats < 1:
        raise ConfigError("repeats must be at least 1")

    row: Dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update(name=config.get("name", "benchmark"), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               command=" ".join(["python", "scripts/benchmark.py"] + list(argv or [])), machine=machine_info(),
               batch_size=batch, dtype=str(dtype), strategy=strategy, steps=steps, schedule_steps=sched_steps,
               cfg_scale=config.sampler.get("cfg_scale"), warmup=warmup, repeats=repeats)
    report(f"machine: {row['machine']['cpu']}, {row['machine']['cores']} cores, backend {row['machine']['backend']}")

    latency = bool(config.get("measure_latency", True))
    t0 = time.perf_counter()
    model32 = build_model(config, abstract=not latency)  # compile-only runs need shapes only
    jax.block_until_ready(model32.params)
    report(f"model ready in {time.perf_counter() - t0:.1f} s")
    cfg = model32.config
    row.update(model=dict(depth=cfg.depth, hidden_size=cfg.hidden_size, patch_size=cfg.patch_size,
                          num_heads=cfg.num_heads, input_size=cfg.input_size,
                          params=int(sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(model32.params)))),
               image_size=cfg.input_size * (8 if cfg.in_channels == 4 else 1))
    router, masks = load_bench_router(config, model32, steps)
    if masks is None:
        raise ConfigError("the benchmark compares full and L2C sampling: set router.checkpoint (a file or 'random')")
    row.update(router=router.source, threshold=float(config.router.threshold))
    run_masks = masks[:sched_steps]
    fb = flop_bound(cfg, run_masks, sched_steps)
    row.update(computed_share=float(np.asarray(run_masks, bool).mean()), flop_bound=fb["bound"],
               bound_with_fixed=fb["bound_with_fixed"])
    report(f"schedule: {sched_steps}/{steps} steps, {row['computed_share'] * 100:.2f}% of sub-layers computed, "
           f"FLOP bound {fb['bound']:.4f}x (with always-computed parts {fb['bound_with_fixed']:.4f}x)")

    # -- compile: cold / warm in fresh processes, then this process's own ahead-of-time compile
    comp: Dict[str, Any] = dict(cache_dir=cache_dir)
    if config.get("measure_compile", True):
        report("compile: cold and warm start of the L2C schedule in fresh processes ...")
        comp.update(measure_compile(config, strategy, batch, workers))
        report(f"  cold {comp['cold_s']:.2f} s, warm {comp['warm_s']:.2f} s, {comp['graphs']} graph(s), "
               f"{comp['workers']} worker(s)")
    if not latency:  # compile-only run
        row["compile"] = comp
        row["memory"] = dict(maxrss_bytes=maxrss_bytes(), device_peak_bytes=device_peak_bytes())
        return _write_row(config, row, report)
    model = typed_model(model32, dtype)
    sampler = build_sampler(model, config, strategy)
    noise, y = _inputs(config, model, batch)
    t0 = time.perf_counter()
    st = sampler.compile(batch, masks, workers=workers)
    st_full = sampler.compile(batch, None, workers=workers)
    comp.update(in_process_s=time.perf_counter() - t0, in_process_graphs=st["graphs"] + st_full["graphs"])
    report(f"  this process: {comp['in_process_graphs']} graph(s) in {comp['in_process_s']:.2f} s "
           f"(persistent cache {'at ' + cache_dir if cache_dir else 'off'})")
    row["compile"] = comp

    # -- latency
    kinds = {"full": None, "l2c": masks}
    times = {k: [] for k in kinds}
    cpu = {k: [] for k in kinds}
    lat = {}

    def once(kind):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_steps(sampler, noise, y, kinds[kind], max_steps)
        out.block_until_ready()
        return out, time.perf_counter() - t0, time.process_time() - c0

    rss0 = maxrss_bytes()
    with RSSPeak() as peak:
        # Warm-up: untimed L2C runs; they call every compiled graph but the full schedule's,
        # which was compiled ahead of time like the others.
        for w in range(warmup):
            _, dt, _ = once("l2c")
            report(f"  warm-up l2c: {dt:.2f} s")
        for r in range(repeats):
            for kind in (("full", "l2c") if r % 2 == 0 else ("l2c", "full")):
                lat[kind], dt, dc = once(kind)
                times[kind].append(dt), cpu[kind].append(dc)
                report(f"  run {r + 1}/{repeats} {kind}: {dt:.2f} s")
    row["full"], row["l2c"] = summarize(times["full"], cpu["full"]), summarize(times["l2c"], cpu["l2c"])
    row["speedup"] = row["full"]["median"] / row["l2c"]["median"]
    row["speedup_over_bound"] = row["speedup"] / row["flop_bound"]
    row["l2c_vs_full_rel"] = _rel(lat["l2c"], lat["full"])
    params_bytes = int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(sampler.model.params)))
    row["memory"] = dict(peak_rss_sampling_bytes=int(peak.peak), maxrss_before_sampling_bytes=rss0,
                         maxrss_bytes=maxrss_bytes(), sampler_params_bytes=params_bytes,
                         device_peak_bytes=device_peak_bytes())
    report(f"full {row['full']['median']:.3f} s, L2C {row['l2c']['median']:.3f} s per batch of {batch} "
           f"(median of {repeats}; min {row['full']['min']:.3f} / {row['l2c']['min']:.3f})")
    report(f"speed-up {row['speedup']:.4f}x, FLOP bound {row['flop_bound']:.4f}x, "
           f"ratio {row['speedup_over_bound']:.4f}")
    from l2c_jax.throughput import device_kind, peak_tflops, throughput_of_schedule
    rows = batch * (2 if sampler.cfg_scale is not None else 1)
    peak, _ = peak_tflops(device_kind(row["machine"]), str(dtype), float(config.get("peak_tflops", 0.0) or 0.0))
    row["throughput"] = throughput_of_schedule(cfg, run_masks, sched_steps, rows, row["full"]["median"],
                                               row["l2c"]["median"], peak)
    report(f"achieved: full {row['throughput']['full_tflops'] * 1e3:.1f} GFLOP/s, "
           f"L2C {row['throughput']['l2c_tflops'] * 1e3:.1f} GFLOP/s"
           + (f" (MFU {row['throughput']['full_mfu'] * 100:.1f}% / {row['throughput']['l2c_mfu'] * 100:.1f}%)"
              if peak else ""))

    # -- bfloat16 deviation from float32
    if dtype == jnp.bfloat16 and config.get("compare_float32", True):
        s32 = build_sampler(model32, config, strategy)
        ref = run_steps(s32, noise, y, masks, max_steps)
        row["bf16_vs_f32"] = dict(l2c_rel_max=_rel(lat["l2c"], ref), l2c_rel_rms=_rel_rms(lat["l2c"], ref))
        report(f"bfloat16 vs float32 L2C latents: max {row['bf16_vs_f32']['l2c_rel_max']:.3e}, "
               f"rms {row['bf16_vs_f32']['l2c_rel_rms']:.3e} (relative)")
        del s32
    sampler = None  # free the JAX graphs and weights before the PyTorch side runs

    # -- the original PyTorch code
    if config.get("torch_reference"):
        if max_steps and max_steps < steps:
            raise ConfigError("torch_reference times whole schedules: leave max_steps at 0")
        report(f"original PyTorch code ({config.torch_reference}), {config.get('torch_threads', 2)} threads ...")
        tw = int(config.get("torch_warmup", 1))
        tr = int(config.get("torch_repeats", repeats))
        try:
            ref, tfull, tl2c = torch_reference(config, model32, router, noise, y, steps, tw, tr, report)
        except Exception as e:  # keep the JAX measurements: write the row, then fail
            row["torch_reference"] = dict(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            _write_row(config, row, report)
            raise
        ref["jax_full_over_torch"] = row["full"]["median"] / ref["full"]["median"]
        ref["full_latents_rel"] = _rel(lat["full"], tfull) if dtype == jnp.float32 else None
        if "l2c" in ref:
            ref["jax_l2c_over_torch"] = row["l2c"]["median"] / ref["l2c"]["median"]
            ref["l2c_latents_rel"] = _rel(lat["l2c"], tl2c) if dtype == jnp.float32 else None
            report(f"torch: full {ref['full']['median']:.2f} s, L2C {ref['l2c']['median']:.2f} s "
                   f"(speed-up {ref['speedup']:.4f}x); JAX/torch time: full {ref['jax_full_over_torch']:.3f}, "
                   f"L2C {ref['jax_l2c_over_torch']:.3f}; latents vs torch: full {ref['full_latents_rel']}, "
                   f"L2C {ref.get('l2c_latents_rel')} (relative max)")
        row["torch_reference"] = ref

    return _write_row(config, row, report)


def _write_row(config, row: dict, report: Callable) -> dict:
    try:
        row["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    out = config.get("output")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        report(f"wrote a row to {out}")
    return row


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
