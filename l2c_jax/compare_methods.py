"""Every caching method on one harness: `run_methods(config, workdir)` behind scripts/compare_methods.py.

For each sampler step count, every method of `config.methods` over its knob
settings becomes a schedule (`l2c_jax.methods`) run by the model's one
sampler, from the same noise and labels:

- computed share (of the full sampler's unit evaluations) and the FLOP bound
  (full FLOPs / the schedule's, the always-computed parts included);
- measured speed-up: the full sampler's median latency over the method's,
  timed side by side in this run on the same batch (`config.strategy`, the
  backend's default, compile excluded);
- quality: FID (digits: in the project's digit-classifier feature space
  against the 1,797 digits; ImageNet models: not computed here, see the
  README) over `config.seeds` noise seeds of `config.num_samples` images each,
  as mean and standard deviation, and PSNR to the full sampler from the same
  noise;
- float32 and bfloat16 rows for full and L2C (`config.bfloat16_rows`).

Writes WORKDIR/methods.json (one row per method, setting and step count) and
WORKDIR/pareto.png (FID against computed share, one line per method, error
bars: the standard deviation over seeds).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax.errors import ConfigError


class MissingRouter(ConfigError):
    """config.routers names no router for a step count (and setting)."""


def _settings(config) -> list:
    """[(method, setting)] in the config's order (the settings of a method: a tuple, or one value)."""
    from l2c_jax.methods import METHODS

    only = [m.strip() for m in str(config.get("only") or "").split(",") if m.strip()]
    unknown = [m for m in only + list(config.methods) if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown caching method {unknown[0]!r} (known: {', '.join(METHODS)})")
    out = []
    for name, values in config.methods.items():
        if only and name not in only:
            continue
        values = values if isinstance(values, (tuple, list)) else (values,)
        out.extend((name, v) for v in values)
    return out


def _fewer(setting, steps: int):
    """fewer_steps' knob: a step count, or a share of `steps` (< 1)."""
    v = float(setting)
    return str(max(1, int(round(v * steps)))) if v < 1 else str(int(v))


def run_methods(config, workdir: Optional[str] = None, report=print) -> list:
    from l2c_jax import distributed
    from l2c_jax.bench.flops import flop_bound
    from l2c_jax.eval.fid import psnr
    from l2c_jax.methods import Context, make_schedule, unit_changes
    from l2c_jax.model import model_from_config
    from l2c_jax.pipelines import sample_noise, timed
    from l2c_jax.retarget import retarget
    from l2c_jax.router import load_router
    from l2c_jax.sampling import is_guided, router_masks, sampler_for

    report = distributed.main_only(report)
    workdir = workdir or config.get("workdir") or "."
    os.makedirs(workdir, exist_ok=True)
    models = {"float32": model_from_config(config.model, dtype=jnp.float32)}
    if config.get("bfloat16_rows"):
        models["bfloat16"] = model_from_config(config.model, dtype=jnp.bfloat16)
    model = models["float32"]
    if model.family != "dit":
        raise ConfigError(f"the methods harness runs DiT models for now, not {model.family}")
    cfg = model.config
    sc = config.sampler
    scale = sc.get("cfg_scale")
    guided = is_guided(model.family, scale)
    n = int(config.num_samples)
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    y = np.arange(n) % cfg.num_classes
    seeds = [int(s) for s in config.seeds]
    reps = int(config.get("repeats", 2))
    strategy = config.get("strategy", "auto")
    gc = sc.get("guidance_channels", 3)
    vae = None
    if config.get("vae") is not None and config.vae.get("checkpoint"):
        from l2c_jax.vae import load_vae
        vae = load_vae(config.vae.checkpoint, chunk_size=config.vae.get("decode_chunk", 16))
    fid_of = _fid_function(config, workdir)

    def sampler(k, dtype="float32"):
        return sampler_for(models[dtype], sc.get("name", "ddim"), k, guided, strategy, guidance_channels=gc)

    rows = []
    for steps in [int(s) for s in config.steps]:
        loaded = {}  # routers read so far, by config key

        def router_schedule(name, thr, steps=steps, loaded=loaded):
            # config.routers: ddim<steps> is the step count's router, ddim<steps>_<name> another (ddim50_k3).
            key = f"ddim{steps}_{name}" if name else f"ddim{steps}"
            if not config.routers.get(key):
                raise MissingRouter(f"config.routers has no router {key!r}")
            if key not in loaded:
                loaded[key] = load_router(config.routers.get(key), kind="dit-ddim")
                if re.search(r"_from\d+$", key):  # ddim20_from50: a router of another step count, retargeted
                    loaded[key] = retarget(loaded[key], steps)
            router = loaded[key]
            thr = config.get("threshold") if thr is None else thr
            return router_masks(model, router, thr, steps), router.forecast

        calib = config.calibration
        changes = functools.lru_cache(maxsize=1)(lambda steps=steps: unit_changes(
            sampler(steps), sample_noise(int(calib.seed), np.arange(int(calib.num_samples)), shape),
            np.arange(int(calib.num_samples)) % cfg.num_classes, cfg_scale=scale if guided else None))
        ctx = Context(num_units=model.num_units, steps=steps, router_schedule=router_schedule, changes=changes)
        noises = {s: sample_noise(s, np.arange(n), shape) for s in seeds}

        def run(schedule, seed, dtype="float32"):
            smp = sampler(schedule.steps, dtype)
            return smp(noises[seed], y, schedule.masks, cfg_scale=scale if guided else None,
                       forecast=schedule.forecast)

        def images(latents):
            x = latents if vae is None else vae.decode(latents / float(config.vae.get("scale", 0.18215)))
            return np.clip(np.asarray(x, np.float32), -1, 1)

        full_sched = make_schedule(ctx, "full")
        full_imgs = {}
        _, t_full, _ = timed(lambda: run(full_sched, seeds[0]), reps)
        for s in seeds:
            full_imgs[s] = images(run(full_sched, s))
        todo = []
        for name, setting in _settings(config):
            if name == "fewer_steps":
                setting = _fewer(setting, steps)
            try:
                todo.append((make_schedule(ctx, name, None if setting in ("-", None) else setting), "float32"))
            except MissingRouter as e:  # a router named for some step counts only (e.g. a longer period at 50)
                if name != "l2c" or not str(setting).strip("-"):
                    raise
                report(f"  {name} {setting}: skipped at DDIM {steps} ({e})")
        for dtype in [d for d in models if d != "float32"]:
            todo += [(make_schedule(ctx, "full"), dtype), (make_schedule(ctx, "l2c"), dtype)]
        report(f"DDIM {steps}: {len(todo)} schedules x {len(seeds)} seeds x {n} images "
               f"(full: {t_full:.3f} s per batch)")
        for sched, dtype in todo:
            first, t, _ = timed(lambda: run(sched, seeds[0], dtype), reps)
            fids, psnrs = [], []
            for s in seeds:
                imgs = images(first if s == seeds[0] else run(sched, s, dtype))
                if fid_of is not None:
                    fids.append(fid_of(imgs, f"{steps}_{sched.method}_{sched.setting}_{dtype}_{s}"))
                psnrs.append(psnr(imgs, full_imgs[s]))
            if sched.masks is None:
                bound = steps / sched.steps
            else:
                bound = flop_bound(cfg, sched.masks, sched.steps)["bound_with_fixed"]
            row = dict(method=sched.method, setting=sched.setting, steps=sched.steps, reference_steps=steps,
                       dtype=dtype, forecast=sched.forecast, computed_share=sched.computed_share,
                       flop_bound=float(bound), latency=t, speedup=t_full / t,
                       fid_mean=float(np.mean(fids)) if fids else None,
                       fid_sd=float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
                       fid_seeds=[float(f) for f in fids],
                       psnr_to_full=float(np.mean([p for p in psnrs if np.isfinite(p)])) if any(
                           np.isfinite(p) for p in psnrs) else float("inf"))
            rows.append(row)
            fid_s = "-" if row["fid_mean"] is None else f"{row['fid_mean']:.2f}" + (
                "" if row["fid_sd"] is None else f"±{row['fid_sd']:.2f}")
            report(f"  {sched.method:<13}{sched.setting:>7} {dtype:<9}{row['computed_share'] * 100:6.1f}% "
                   f"bound {bound:4.2f}x  measured {row['speedup']:4.2f}x  FID {fid_s:>12}  "
                   f"PSNR {row['psnr_to_full']:5.1f} dB")
    add_paired_gaps(rows)
    meta = dict(machine=jax.devices()[0].device_kind, backend=jax.default_backend(), strategy=strategy,
                num_samples=n, seeds=seeds, repeats=reps, features=config.eval.get("features") or None,
                date=time.strftime("%Y-%m-%d"))
    path = os.path.join(workdir, "methods.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=float)
    png = plot_pareto(rows, os.path.join(workdir, "pareto.png"))
    report(f"wrote {path}" + (f" and {png}" if png else ""))
    return rows


def add_paired_gaps(rows) -> list:
    """Adds fid_gap_mean / fid_gap_sd: FID minus the float32 full sampler's, seed by seed (the same noise),
    so the spread that the seeds share cancels; the issue's rule compares the unpaired spreads."""
    for r in rows:
        full = next((f for f in rows if f["method"] == "full" and f["dtype"] == "float32"
                     and f["reference_steps"] == r["reference_steps"]), None)
        if full is None or not r["fid_seeds"] or len(full["fid_seeds"]) != len(r["fid_seeds"]):
            r["fid_gap_mean"] = r["fid_gap_sd"] = None
            continue
        gap = np.asarray(r["fid_seeds"]) - np.asarray(full["fid_seeds"])
        r["fid_gap_mean"] = float(gap.mean())
        r["fid_gap_sd"] = float(gap.std(ddof=1)) if len(gap) > 1 else None
    return rows


def _fid_function(config, workdir):
    """(images in [-1, 1], name) -> FID, from config.eval: the digit classifier's features, the ADM
    evaluator against `eval.reference` (Inception features; the images are written as WORKDIR/npz/NAME.npz),
    or None (PSNR to the full sampler only)."""
    ev = config.eval
    if ev.get("features") == "digits":
        from l2c_jax.eval.digits_classifier import DigitFeatures

        feats = DigitFeatures()
        return lambda imgs, name: feats.fid_to_data(imgs)
    if ev.get("reference"):
        from l2c_jax import images as imio
        from l2c_jax.eval.evaluator import evaluate
        from l2c_jax.eval.inception import load_inception

        if not os.path.isfile(ev.reference):
            raise ConfigError(f"config.eval.reference: no such file {ev.reference}")
        net = load_inception(ev.inception)

        def adm_fid(imgs, name):
            path = os.path.join(workdir, "npz", name.replace("/", "-") + ".npz")
            imio.save_npz(path, imio.to_uint8(imgs))
            return float(evaluate(path, ev.reference, net, batch_size=int(ev.get("batch_size", 64)),
                                  progress=False)["FID"])
        return adm_fid
    return None


def plot_pareto(rows, path: str) -> Optional[str]:
    """FID (mean ± sd over seeds) against computed share, a panel per step count, a line per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("the Pareto picture needs matplotlib: pip install 'l2c_jax[plots]'") from e
    rows = [r for r in rows if r["dtype"] == "float32"]
    # FID where it was computed; else fidelity to the full sampler (PSNR, higher is better).
    key, label = (("fid_mean", "FID (mean ± sd over seeds)") if any(r["fid_mean"] is not None for r in rows)
                  else ("psnr_to_full", "PSNR to the full sampler (dB)"))
    rows = [r for r in rows if r[key] is not None and np.isfinite(r[key]) or r["method"] == "full"]
    if not rows:
        return None
    steps = sorted({r["reference_steps"] for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(6.5 * len(steps), 4.8), squeeze=False)
    for ax, n in zip(axes[0], steps):
        these = [r for r in rows if r["reference_steps"] == n]
        for m in dict.fromkeys(r["method"] for r in these):
            pts = sorted((r for r in these if r["method"] == m), key=lambda r: r["computed_share"])
            if m == "full":
                if key == "fid_mean":
                    ax.axhline(pts[0]["fid_mean"], color="k", lw=0.8, ls=":", label=f"full DDIM {n}")
                continue
            ax.errorbar([p["computed_share"] for p in pts], [p[key] for p in pts],
                        yerr=[(p["fid_sd"] or 0) if key == "fid_mean" else 0 for p in pts], marker="o", ms=4,
                        capsize=3, label=m)
        ax.set_xlabel("computed share of unit evaluations")
        ax.set_ylabel(label)
        if key == "fid_mean":
            ax.set_yscale("log")  # the methods span two orders of magnitude; the good ones sit near full
        ax.set_title(f"DDIM {n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
