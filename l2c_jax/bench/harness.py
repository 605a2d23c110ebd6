"""What every benchmark mode shares: the machine, timing summaries, the model / router / sampler it
measures (built with the library's own loaders and samplers), and writing the JSON row."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from typing import Callable, Optional

import numpy as np

from l2c_jax.errors import ConfigError



def package_env() -> dict:
    """The environment for a child process that must import this very l2c_jax (installed or not)."""
    from l2c_jax.resources import PACKAGE_DIR

    site = os.path.dirname(PACKAGE_DIR)
    return dict(os.environ, PYTHONPATH=site + (os.pathsep + os.environ["PYTHONPATH"]
                                               if os.environ.get("PYTHONPATH") else ""))


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


def rel(a, b) -> Optional[float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.abs(b).max()
    return float(np.abs(a - b).max() / den) if den > 0 else None


def rel_rms(a, b) -> Optional[float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.sqrt(np.mean(b * b))
    return float(np.sqrt(np.mean((a - b) ** 2)) / den) if den > 0 else None


# --------------------------------------------------------------------------- model, router, samplers


def model_config(config):
    """The DiTConfig a benchmark config's `model` section names (schema: l2c_jax/configs/common.py)."""
    return build_model(config, abstract=True).config


def build_model(config, abstract: bool = False, families=("dit",)):
    """A float32 `Model` from `config.model`: converted (`checkpoint`) or random (`random_init`,
    `name` + `arch`), as `l2c_jax.model.model_from_config` reads it; abstract = shapes only. families: those
    the calling benchmark times (DiT only, but for the schedules benchmark)."""
    from l2c_jax.model import model_from_config

    model = model_from_config(config.model, abstract=abstract)
    if model.family not in families:
        raise ConfigError(f"this benchmark times {' and '.join(families)} sampling; config.model is a "
                          f"{model.family} model")
    return model


def bench_schedule(config, model, sampler):
    """(Router or None, Schedule) a benchmark times against full sampling, through the one schedule path
    (`l2c_jax.sampling.resolve_schedule`): `config.schedule` (any caching method, e.g. "taylorseer:3/2"; "l2c"
    reads the router), else `router.checkpoint` = a file or "random" (a seeded random router); a router's
    forecast is kept."""
    from l2c_jax.router import Router, load_router
    from l2c_jax.sampling import resolve_schedule

    rc = config.get("router")
    router = None
    if rc is not None and rc.get("checkpoint"):
        if rc.checkpoint == "random":
            rng = np.random.default_rng(int(rc.get("seed", 0)))
            router = Router(rng.normal(0.0, 2.0, size=(sampler.rows, model.num_units)).astype(np.float32),
                            "dit-ddim", threshold=rc.get("threshold"), source="random")
        else:
            router = load_router(rc.checkpoint, kind=rc.get("kind") or None)
    spec = config.get("schedule") or None
    if spec is None and router is None:
        raise ConfigError("the benchmark compares full sampling with a cache schedule: set router.checkpoint "
                          "(a file or 'random') or schedule (e.g. 'taylorseer:3/2')")
    threshold = rc.get("threshold") if router is not None else None
    return router, resolve_schedule(model, sampler, spec, router=router, threshold=threshold,
                                    retarget=bool(rc.get("retarget")) if router is not None else False)


def typed_model(model, dtype):
    """The model computing in `dtype`; for bfloat16 its parameters are stored in bfloat16 too."""
    import jax.numpy as jnp
    from l2c_jax.model import Model
    from l2c_jax.parallel import cast_floating

    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return model
    return Model(model.family, model.config, cast_floating(model.params, dtype), dtype=dtype)


def resolve_strategy(name: str) -> str:
    from l2c_jax.sampling.base import resolve_strategy as resolve

    return resolve(name)


def build_sampler(model, config, strategy: str):
    from l2c_jax.sampling import sampler_class

    sc = config.sampler
    kw = dict(history_dtype=config.history_dtype) if config.get("history_dtype") else {}
    return sampler_class(model.family)(model, int(sc.steps), solver=sc.get("name", "ddim"),
                                       cfg_scale=sc.get("cfg_scale"), eta=sc.get("eta", 0.0),
                                       guidance_channels=sc.get("guidance_channels", 3), strategy=strategy, **kw)


def inputs(config, model, batch: int):
    import jax

    cfg = model.config
    key = jax.random.key(int(config.get("seed", 0)))
    noise = jax.random.normal(key, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
    labels = list(config.get("labels") or (0,))
    y = np.resize(np.asarray(labels, np.int64) % cfg.num_classes, batch).astype(np.int32)
    return noise, y


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


def write_row(config, row: dict, report: Callable) -> dict:
    try:
        row["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    out = config.get("output")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row, default=json_default) + "\n")
        report(f"wrote a row to {out}")
    return row


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
