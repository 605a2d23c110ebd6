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
from l2c_jax.pareto import plot_pareto


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


def _settings_at(config, steps: int) -> list:
    """`_settings` that run at `steps`: a knob written "ddimN:KNOB" (U-ViT: "dpmN:KNOB") runs at N steps only
    (as KNOB)."""
    out = []
    for name, setting in _settings(config):
        only_at = re.fullmatch(r"(?:ddim|dpm)(\d+):(.+)", str(setting))
        if only_at and int(only_at[1]) != steps:
            continue
        out.append((name, only_at[2] if only_at else setting))
    return out


def _fewer(setting, steps: int, multiple: int = 1):
    """fewer_steps' knob: a step count, or a share of `steps` (< 1), rounded to a `multiple` (U-ViT's
    DPM-Solver-2 evaluates twice per step)."""
    v = float(setting)
    k = max(1, int(round(v * steps))) if v < 1 else int(v)
    return str(max(multiple, multiple * int(round(k / multiple))))


class Harness:
    """One model under the harness: its noise per seed (image i from (seed, i)), the full sampler's images and
    latency per step count, and `measure(schedule)`: a row of methods.json, side by side with full.

    config: the harness keys of configs/methods_digits.py (model, routers, threshold, sampler, num_samples,
    seeds, repeats, strategy, eval, calibration, vae, bfloat16_rows).
    """

    def __init__(self, config, workdir: str, report=print):
        from l2c_jax.model import model_from_config
        from l2c_jax.sampling import calibration_labels, is_guided, sampler_class

        self.config, self.workdir, self.report = config, workdir, report
        self.models = {"float32": model_from_config(config.model, dtype=jnp.float32)}
        if config.get("bfloat16_rows"):
            self.models["bfloat16"] = model_from_config(config.model, dtype=jnp.bfloat16)
        self.model = self.models["float32"]
        if self.model.family not in ("dit", "uvit"):
            raise ConfigError(f"the methods harness runs DiT and U-ViT models, not {self.model.family}")
        # Router names, step knobs and labels: DDIM steps for DiT, DPM-Solver-2 NFE for U-ViT.
        self.family = sampler_class(self.model.family)
        cfg = self.model.config
        sc = config.sampler
        self.scale = sc.get("cfg_scale")
        self.guided = is_guided(self.model.family, self.scale)
        self.n = int(config.num_samples)
        self.shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
        self.y = calibration_labels(cfg, self.n)
        self.seeds = [int(s) for s in config.seeds]
        self.reps = int(config.get("repeats", 2))
        self.strategy = config.get("strategy", "auto")
        self.vae = None
        if config.get("vae") is not None and config.vae.get("checkpoint"):
            from l2c_jax.vae import load_vae
            self.vae = load_vae(config.vae.checkpoint, chunk_size=config.vae.get("decode_chunk", 16))
        self.fid_of = _fid_function(config, workdir)
        self._routers = {}
        self._steps = None

    def sampler(self, steps: int, dtype: str = "float32", **options):
        from l2c_jax.sampling import sampler_for

        sc = self.config.sampler
        return sampler_for(self.models[dtype], sc.get("name", self.family.default_solver), int(steps), self.guided,
                           self.strategy, **self.family.options_from_config(sc),
                           **{k: v for k, v in options.items() if v})

    def router(self, steps: int, name: str = ""):
        """config.routers: ddim<steps> is the step count's router, ddim<steps>_<name> another (ddim50_k3);
        ddimM_fromN a router of N steps, retargeted (U-ViT: dpm<NFE>...)."""
        from l2c_jax.router import load_router

        prefix = self.family.rows_prefix
        key = f"{prefix}{steps}_{name}" if name else f"{prefix}{steps}"
        if not self.config.routers.get(key):
            raise MissingRouter(f"config.routers has no router {key!r}")
        if key not in self._routers:
            self._routers[key] = load_router(self.config.routers.get(key), kind=self.family.router_kind)
        return self._routers[key], bool(re.search(r"_from\d+$", key))

    def begin(self, steps: int):
        """Starts a step count: its methods' context, the noise of every seed, the full sampler's images and
        latency. Returns the context (`l2c_jax.methods.Context`)."""
        from l2c_jax.methods import Context, schedule_error, unit_changes
        from l2c_jax.pipelines import sample_noise, timed
        from l2c_jax.sampling import calibration_labels, resolve_schedule

        steps = int(steps)
        self._steps = steps
        full = self.sampler(steps)

        def router_schedule(name, thr):
            router, retarget = self.router(steps, name)
            thr = self.config.get("threshold") if thr is None else thr
            return resolve_schedule(self.model, full, router=router, threshold=thr, retarget=retarget)

        calib, cfg = self.config.calibration, self.model.config
        changes = functools.lru_cache(maxsize=1)(lambda: unit_changes(
            full, sample_noise(int(calib.seed), np.arange(int(calib.num_samples)), self.shape),
            calibration_labels(cfg, int(calib.num_samples)), cfg_scale=self._scale()))
        n_search = int(calib.get("search_samples", 256))
        error = schedule_error(full, sample_noise(int(calib.seed), np.arange(n_search), self.shape),
                               calibration_labels(cfg, n_search), cfg_scale=self._scale())
        self.ctx = Context(num_units=self.model.num_units, steps=steps, router_schedule=router_schedule,
                           changes=changes, error=error)
        self.noises = {s: sample_noise(s, np.arange(self.n), self.shape) for s in self.seeds}
        from l2c_jax.methods import make_schedule

        self.full_schedule = make_schedule(self.ctx, "full")
        _, self.t_full, self.t_full_sd = timed(lambda: self.run(self.full_schedule, self.seeds[0]), self.reps)
        self.full_images = {s: self.images(self.run(self.full_schedule, s)) for s in self.seeds}
        return self.ctx

    def _scale(self):
        return self.scale if self.guided else None

    def run(self, schedule, seed: int, dtype: str = "float32", **options):
        smp = self.sampler(schedule.steps, dtype, **options)
        return smp(self.noises[seed], self.y, schedule, cfg_scale=self._scale())

    def images(self, latents):
        x = latents if self.vae is None else self.vae.decode(latents / float(self.config.vae.get("scale", 0.18215)))
        return np.clip(np.asarray(x, np.float32), -1, 1)

    def measure(self, schedule, dtype: str = "float32", **options):
        """(the row, the first seed's images) of one schedule, timed side by side with the full sampler
        (compile excluded), scored over every seed. options: sampler options (history_dtype, cache_dtype)."""
        from l2c_jax.bench.flops import flop_bound
        from l2c_jax.eval.fid import psnr
        from l2c_jax.pipelines import timed

        steps, cfg = self._steps, self.model.config
        first, t, t_sd = timed(lambda: self.run(schedule, self.seeds[0], dtype, **options), self.reps)
        fids, psnrs, shown = [], [], None
        for s in self.seeds:
            imgs = self.images(first if s == self.seeds[0] else self.run(schedule, s, dtype, **options))
            if shown is None:
                shown = imgs
            if self.fid_of is not None:
                tag = "_".join(str(v) for v in options.values() if v)
                fids.append(self.fid_of(imgs, f"{steps}_{schedule.method}_{schedule.setting}_{dtype}{tag}_{s}"))
            psnrs.append(psnr(imgs, self.full_images[s]))
        if schedule.masks is None:
            bound = steps / schedule.steps
        else:
            bound = flop_bound(cfg, schedule.masks, schedule.steps)["bound_with_fixed"]
        smp = self.sampler(schedule.steps, dtype, **options)
        hist = smp.history_bytes(schedule, self.n)
        finite = [p for p in psnrs if np.isfinite(p)]
        row = dict(method=schedule.method, setting=schedule.setting, steps=schedule.steps, reference_steps=steps,
                   dtype=dtype, forecast=schedule.forecast,
                   history_dtype=str(smp.history_dtype) if schedule.forecasts else None,
                   cache_dtype=options.get("cache_dtype") or None,
                   history_bytes=hist["kept"], history_bytes_all_units=hist["all_units"],
                   anchors=None if schedule.anchors is None else [int(a) for a in np.flatnonzero(schedule.anchors)],
                   computed_share=schedule.computed_share, flop_bound=float(bound), latency=t, latency_sd=t_sd,
                   speedup=self.t_full / t, fid_mean=float(np.mean(fids)) if fids else None,
                   fid_sd=float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
                   fid_seeds=[float(f) for f in fids],
                   psnr_to_full=float(np.mean(finite)) if finite else float("inf"))
        return row, shown


def run_methods(config, workdir: Optional[str] = None, report=print) -> list:
    from l2c_jax import distributed

    report = distributed.main_only(report)
    workdir = workdir or config.get("workdir") or "."
    with distributed.hold_workdir(workdir, "methods"):
        return _run_methods(config, workdir, report)


def _run_methods(config, workdir, report) -> list:
    from l2c_jax.methods import make_schedule

    h = Harness(config, workdir, report)
    rows = []
    for steps in [int(s) for s in config.steps]:
        ctx = h.begin(steps)
        todo = []
        for name, setting in _settings_at(config, steps):
            if name == "fewer_steps":
                setting = _fewer(setting, steps, h.family.step_multiple)
            try:
                start = time.perf_counter()
                todo.append((make_schedule(ctx, name, None if setting in ("-", None) else setting), "float32", {}))
                made = time.perf_counter() - start
                if made > 10:  # a calibration or search, not a lookup: its cost belongs beside its row
                    where = todo[-1][0].anchors
                    report(f"  {name} {setting}: made in {made:.0f} s" + (
                        "" if where is None else f" (full steps {','.join(map(str, np.flatnonzero(where)))})"))
            except MissingRouter as e:  # a router named for some step counts only (e.g. a longer period at 50)
                if name != "l2c" or not str(setting).strip("-"):
                    raise
                report(f"  {name} {setting}: skipped at {h.family.rows_label} {steps} ({e})")
        for dtype in [d for d in h.models if d != "float32"]:
            todo += [(make_schedule(ctx, "full"), dtype, {}), (make_schedule(ctx, "l2c"), dtype, {})]
        for hd in config.get("history_dtypes") or ():  # forecasting schedules again, their history narrower
            todo += [(sched, "float32", dict(history_dtype=hd)) for sched, d, o in list(todo)
                     if d == "float32" and not o and sched.forecasts]
        report(f"{h.family.rows_label} {steps}: {len(todo)} schedules x {len(h.seeds)} seeds x {h.n} images "
               f"(full: {h.t_full:.3f} s per batch)")
        for sched, dtype, options in todo:
            row, _ = h.measure(sched, dtype, **options)
            rows.append(row)
            report("  " + describe_row(row))
    add_paired_gaps(rows)
    meta = dict(machine=jax.devices()[0].device_kind, backend=jax.default_backend(), strategy=h.strategy,
                num_samples=h.n, seeds=h.seeds, repeats=h.reps, features=config.eval.get("features") or None,
                date=time.strftime("%Y-%m-%d"))
    path = os.path.join(workdir, "methods.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=float)
    png = plot_pareto(rows, os.path.join(workdir, "pareto.png"), paired=bool(config.get("paired_picture")),
                      solver=h.family.rows_label)
    report(f"wrote {path}" + (f" and {png}" if png else ""))
    return rows


def describe_row(row) -> str:
    """One line of the harness's log for a row."""
    fid_s = "-" if row["fid_mean"] is None else f"{row['fid_mean']:.2f}" + (
        "" if row["fid_sd"] is None else f"±{row['fid_sd']:.2f}")
    dtype = row["dtype"] + (f"/h:{row['history_dtype']}" if row.get("history_dtype") not in (None, "float32") else "")
    hist = f"  history {row['history_bytes'] / 2**20:.0f}/{row['history_bytes_all_units'] / 2**20:.0f} MiB" \
        if row.get("history_bytes_all_units") else ""
    return (f"{row['method']:<13}{row['setting']:>16} {dtype:<10}{row['computed_share'] * 100:6.1f}% "
            f"bound {row['flop_bound']:4.2f}x  measured {row['speedup']:4.2f}x  FID {fid_s:>12}  "
            f"PSNR {row['psnr_to_full']:5.1f} dB{hist}")


def run_compare(config, workdir: Optional[str] = None, report=print) -> list:
    """The Quick start's comparison: full DDIM, DDIM + L2C (the config's router), and DDIM with fewer steps at
    L2C's latency (or `config.compare_steps`), run by the methods harness from the same per-image noise.

    Reports, in the paper's form, latency, share of sub-layers computed, FID (in the feature space
    `config.eval.features` names), fidelity to the full sampler (PSNR), and writes a side-by-side PNG (a row
    per schedule) and the table as compare.json. `config.compare_cache_dtype` adds the L2C row with its
    carried cache in that dtype.
    """
    import ml_collections

    from l2c_jax import distributed

    if config.get("router") is None or not config.router.get("checkpoint"):
        raise ConfigError("compare needs config.router.checkpoint")
    steps = int(config.sampler.steps)
    hc = ml_collections.ConfigDict(dict(
        model=config.model, routers={f"ddim{steps}": config.router.checkpoint},
        threshold=config.router.get("threshold"), sampler=config.sampler, num_samples=int(config.eval.num_samples),
        seeds=(int(config.seed),), repeats=int(config.get("repeats", 3)), strategy=config.get("strategy", "static"),
        eval=dict(features=config.eval.get("features") or ""), calibration=dict(num_samples=8, seed=1000),
        vae=config.get("vae") or dict(checkpoint="")))
    workdir = workdir or config.get("workdir") or "."
    with distributed.hold_workdir(workdir, "compare"):
        return _run_compare(config, workdir, report, hc, steps)


def _run_compare(config, workdir, report, hc, steps) -> list:
    from l2c_jax import images as imio
    from l2c_jax.methods import make_schedule

    h = Harness(hc, workdir, report)
    ctx = h.begin(steps)
    l2c = make_schedule(ctx, "l2c")
    l2c_row, l2c_imgs = h.measure(l2c)
    # The honest baseline: plain DDIM given the time L2C takes (or config.compare_steps steps).
    k = int(config.get("compare_steps", 0) or 0) or max(2, int(round(steps * l2c_row["latency"] / h.t_full)))
    fewer_row, fewer_imgs = h.measure(make_schedule(ctx, "fewer_steps", k))
    full_row = dict(method="full", setting="-", steps=steps, latency=h.t_full, latency_sd=h.t_full_sd,
                    computed_share=1.0, fid_mean=None, psnr_to_full=float("inf"))
    full_imgs = h.full_images[h.seeds[0]]
    if h.fid_of is not None:
        full_row["fid_mean"] = h.fid_of(full_imgs, f"{steps}_full")
    names = [f"DDIM {steps}", f"DDIM {steps} + L2C", f"DDIM {k} (L2C's latency)"]
    rows = []
    for name, r in zip(names, (full_row, l2c_row, fewer_row)):
        rows.append(dict(method=name, nfe=int(r["steps"]), latency=r["latency"], latency_std=r["latency_sd"],
                         computed=r["computed_share"], fid=r["fid_mean"], psnr_to_full=r["psnr_to_full"]))
    cfg = h.model.config
    show = [imio.to_uint8(x[:cfg.num_classes]) for x in (full_imgs, l2c_imgs, fewer_imgs)]
    png = os.path.join(workdir, config.get("grid", "compare.png"))
    imio.save_png(png, imio.make_grid(np.concatenate(show), nrow=cfg.num_classes, padding=1),
                  upscale=config.get("grid_upscale", 8))
    report(f"{h.n} samples, batch {h.n}, CFG {config.sampler.get('cfg_scale')}, {jax.devices()[0].platform}, "
           f"noise per image from seed {h.seeds[0]}; rows of {png}: DDIM {steps} | DDIM {steps} + L2C | DDIM {k}")
    report(f"{'method':<26}{'latency (s)':>16}{'computed':>10}{'FID':>9}{'PSNR vs full':>14}")
    for r in rows:
        fid_s = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        ps = "inf" if not np.isfinite(r["psnr_to_full"]) else f"{r['psnr_to_full']:.1f} dB"
        report(f"{r['method']:<26}{r['latency']:>9.3f} ±{r['latency_std']:.3f}{r['computed'] * 100:>9.1f}%"
               f"{fid_s:>9}{ps:>14}")
    report(f"L2C speed-up {h.t_full / l2c_row['latency']:.2f}x over DDIM {steps}")
    if h.fid_of is not None and config.eval.get("features") == "digits":
        report("FID: features of the project's digit classifier against all 1797 digits")
    narrow = config.get("compare_cache_dtype")
    if narrow:  # what a narrower feature cache costs: the same L2C run, only the carried cache rounded
        lean_row, lean_imgs = h.measure(l2c, cache_dtype=narrow)
        rows.append(dict(method=f"DDIM {steps} + L2C, {narrow} cache", nfe=steps, computed=l2c_row["computed_share"],
                         fid=lean_row["fid_mean"], psnr_to_full=lean_row["psnr_to_full"],
                         psnr_to_float32_cache=psnr_of(lean_imgs, l2c_imgs)))
        r = rows[-1]
        report(f"{narrow} feature cache: PSNR {r['psnr_to_float32_cache']:.1f} dB to the float32-cache L2C images, "
               f"{r['psnr_to_full']:.1f} dB to full DDIM {steps}"
               + (f", FID {r['fid']:.2f}" if r["fid"] is not None else ""))
    with open(os.path.join(workdir, "compare.json"), "w") as f:  # the table, for scripts and tests
        json.dump(dict(rows=rows), f, indent=1, default=float)
    return rows


def psnr_of(a, b) -> float:
    from l2c_jax.eval.fid import psnr

    return float(psnr(a, b))


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
