"""End-to-end jobs behind the scripts: `run_sampling(config, workdir)`.

Loads the converted model (DiT with DDIM/DDPM, or U-ViT with DPM-Solver),
router and VAE named by the config, samples the requested labels (none for
an unconditional U-ViT) in batches (data-parallel over local devices), decodes,
writes a PNG grid and optionally the ADM evaluator's npz, and reports the
latency per batch and the schedule's share of computed sub-layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax import images as imio
from l2c_jax.errors import ConfigError, L2CError
from l2c_jax.sampling.draws import draw_labels, sample_noise, sample_step_keys

log = logging.getLogger(__name__)


class SamplingError(L2CError):
    """A sampling run that produced unusable values (NaN or inf)."""


def sample_labels(config, num_classes: int) -> np.ndarray:
    """The class of every image: config.labels repeated to num_samples, or drawn per image from (seed, i)."""
    if config.get("labels"):
        y = np.asarray(list(config.labels), np.int64)
        n = int(config.get("num_samples") or len(y))
        y = np.resize(y, n)
    else:
        n = int(config.get("num_samples") or 0)
        if n <= 0:
            raise ConfigError("set labels or num_samples")
        y = draw_labels(config.seed, np.arange(n), num_classes)
    if y.min() < 0 or y.max() >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes - 1}], got {y.min()}..{y.max()}")
    return y


def load_for_sampling(config, mesh=None):
    """(model, router or None, vae or None) from the config's paths, weights replicated over `mesh`
    (default: every device)."""
    from l2c_jax.model import model_from_config

    model = model_from_config(config.model, dtype=jnp.dtype(config.get("dtype", "float32")),
                              mesh=mesh).on_devices(mesh)
    router = None
    rc = config.get("router")
    if rc is not None and rc.get("checkpoint"):
        from l2c_jax.router import load_router
        router = load_router(rc.checkpoint, kind=rc.get("kind") or None)
    vae = None
    vc = config.get("vae")
    if vc is not None and vc.get("checkpoint"):
        from l2c_jax.vae import load_vae
        vae = load_vae(vc.checkpoint, chunk_size=vc.get("decode_chunk", 16), mesh=mesh)
    return model, router, vae


def _make_sampler(model, router, config):
    """(sampler, schedule, what it runs, what the share is of).

    The schedule comes from the one path (`l2c_jax.sampling.resolve_schedule`):
    `config.schedule` (any caching method, e.g. "taylorseer:3/2"; "l2c..."
    reads the config's router), else the config's router (retargeted when
    `config.router.retarget`), else every unit. The sampler is the model's own
    (`l2c_jax.sampling.sampler_for`), so every batch, and every later job on
    the same model, reuses its compiled steps.
    """
    from l2c_jax.sampling import is_guided, resolve_schedule, sampler_class, sampler_for

    sc = config.sampler
    rc = config.get("router")
    cls = sampler_class(model.family)
    kw = dict(cache_dtype=config.get("cache_dtype") or None, **cls.options_from_config(sc))
    if config.get("history_dtype"):
        if model.family != "dit":
            raise ConfigError(f"history_dtype applies to forecasting schedules, which {model.family} does not run")
        kw["history_dtype"] = config.history_dtype
    guided = is_guided(model.family, sc.get("cfg_scale"))

    def sampler(steps):
        return sampler_for(model, sc.get("name", cls.solvers[0]), int(steps), guided, config.get("strategy", "static"),
                           **kw)

    smp = sampler(sc.steps)
    spec = config.get("schedule") or None
    schedule = resolve_schedule(model, smp, spec, router=router,
                                threshold=rc.get("threshold") if router is not None else None,
                                retarget=bool(rc.get("retarget")) if rc is not None else False,
                                skip_type=sc.get("skip_type", "time_uniform"), calibration=config.get("calibration"))
    if schedule.steps is not None and int(schedule.steps) != smp.rows:  # fewer_steps: its own step count
        smp = sampler(schedule.steps)
    what, of_what = smp.describe()
    return smp, schedule, what, of_what


def _check_evaluation(config) -> None:
    """Refuses a scoring set-up that cannot work, before hours of sampling."""
    ev = config.get("evaluate")
    if ev is None or not ev.get("reference"):
        return
    if not os.path.isfile(ev.reference):
        raise ConfigError(f"config.evaluate.reference: no such file {ev.reference}")
    if not os.path.isfile(os.path.join(str(ev.get("inception") or ""), "config.json")):
        raise ConfigError(f"config.evaluate.inception={ev.get('inception')!r} is not a converted Inception "
                          "(python convert/inception.py --checkpoint pt_inception-2015-12-05-6726825d.pth --out DIR)")


def run_sampling(config, workdir: Optional[str] = None, report=print) -> dict:
    """Samples, decodes and writes the images a sampling config asks for.

    Image i's label and noise depend only on (config.seed, i), so the images
    do not depend on the batch size or on how many processes and devices
    share the job. Each process samples its own batches on its own devices
    (`parallel.local_mesh`) and writes them as shards with their indices
    (`l2c_jax.shards`); a rerun of an interrupted job samples only what is
    missing. Process 0 then writes the grid, the npz (streamed from the
    shards, each index checked present exactly once) and the scores, and
    removes the shards.

    Reports latency per batch, the computed share, and wall time and peak
    memory per phase: load (model, router, VAE), compile (the step graphs;
    for U-ViT, which compiles on first use, the first run of the first
    batch), sample (every other sampling run) and decode.
    """
    from l2c_jax import compile_cache, distributed, parallel
    from l2c_jax.memory import Phases

    compile_cache.from_setting(config.get("compilation_cache_dir", "default"))
    _check_evaluation(config)  # before the sampling it would score, not after
    report = distributed.main_only(report)
    workdir = os.path.abspath(workdir or config.get("workdir") or ".")
    phases = Phases()
    with contextlib.ExitStack() as held:
        # Before loading anything: the workdir is this job's (lock, kind, outputs), on process 0 for all.
        distributed.on_main(lambda: claim_sampling_workdir(config, workdir, held), "sampling workdir")
        try:
            with phases("load"):
                mesh = parallel.local_mesh()  # sampling needs no other process: each runs its own batches
                model, router, vae = load_for_sampling(config, mesh)
                made = _make_sampler(model, router, config)
            return _sample_batches(config, workdir, report, model, vae, made, phases, mesh)
        finally:
            phases.close()


def _npz_path(config, workdir: str) -> Optional[str]:
    ev = config.get("evaluate")
    if config.get("npz") or (ev is not None and ev.get("reference")):
        return os.path.join(workdir, config.get("npz") or "samples.npz")
    return None


def claim_sampling_workdir(config, workdir: str, held: contextlib.ExitStack) -> None:
    """Locks `workdir` for this job (released with `held`) and refuses, before any work, a workdir of
    another kind, an npz inside the shards folder (deleted with it), and outputs a different job wrote
    (a rerun with another seed replaced them silently) unless config.overwrite. Records this job."""
    from l2c_jax import outputs, workdirs
    from l2c_jax.shards import job_fingerprint

    held.enter_context(workdirs.lock(workdir))
    record = workdirs.claim(workdir, "sample")
    shards = os.path.join(workdir, "shards")
    npz = _npz_path(config, workdir)
    if npz and outputs.holds(shards, npz):
        raise ConfigError(f"config.npz {npz} lies in {shards}, the job's scratch folder (removed when the job "
                          "ends); write it elsewhere")
    job = json.loads(json.dumps(job_fingerprint(config), sort_keys=True, default=str))
    names = [p for p in (npz, os.path.join(workdir, config.get("grid", "samples.png")),
                         os.path.join(workdir, "report.json")) if p and os.path.exists(p)]
    if names and record.get("job") != job and not config.get("overwrite", False):
        there = record.get("job")
        why = ("no sampling job recorded them" if there is None else "another job wrote them (it differs in "
               + ", ".join(sorted(k for k in set(there) | set(job) if there.get(k) != job.get(k))) + ")")
        raise ConfigError(f"{workdir} holds {', '.join(os.path.basename(n) for n in names)}: {why}; pass "
                          "--config.overwrite=True to replace them, or use another --workdir (nothing was changed)")
    workdirs.write_record(workdir, dict(record, job=job))


def _sample_batches(config, workdir, report, model, vae, made, phases, mesh) -> dict:
    """Samples the job's missing images into its shards, then (process 0) writes its outputs and report."""
    from l2c_jax import distributed
    from l2c_jax.shards import ShardStore, batches_of, job_fingerprint

    sampler, schedule = made[0], made[1]
    labels, n = _job_labels(config, model.config)
    bs = int(config.batch_size)
    if bs < 1:
        raise ConfigError(f"batch_size must be positive, got {bs}")
    store = ShardStore(os.path.join(workdir, "shards"), job_fingerprint(config), n)
    distributed.on_main(store.prepare, "shards")
    store.check()
    remaining = store.remaining()
    distributed.barrier("l2c-shards-scanned")  # every process dealt the same remaining indices
    mine = batches_of(remaining, bs, jax.process_index(), jax.process_count())
    if len(remaining) < n:
        report(f"resuming: {n - len(remaining)} of {n} images are already in {store.directory}")
    aot = mesh.devices.size == 1 and sampler.compile_ahead and bool(mine)
    if aot:  # every graph of the schedule, compiled ahead and in parallel
        with phases("compile"):
            sampler.compile(bs, schedule)
    times = _run_batches(config, made, vae, store, mine, labels, bs, phases, mesh, aot)
    distributed.barrier("l2c-shards-written")
    sampled = int(sum(len(i) for i in mine))
    if not distributed.is_main():
        return dict(num_images=n, sampled=sampled, process=jax.process_index())
    return _write_outputs(config, workdir, report, model, made, store, n, bs, sampled, times, phases, aot)


def _job_labels(config, cfg):
    """(labels or None for an unconditional model, number of images)."""
    if not cfg.conditional:
        n = int(config.get("num_samples") or len(config.get("labels") or ()))
        if n <= 0:
            raise ConfigError("set num_samples (this model is unconditional: labels are ignored)")
        return None, n
    labels = sample_labels(config, cfg.null_class)  # the classes below the null class
    return labels, len(labels)


def _run_batches(config, made, vae, store, mine, labels, bs, phases, mesh, aot) -> list:
    """Samples and decodes this process's batches into `store`; the timed latencies (s per batch)."""
    from tqdm.auto import tqdm

    from l2c_jax import distributed, parallel
    from l2c_jax.memory import release_free_heap

    sampler, schedule, what = made[0], made[1], made[2]
    cfg = sampler.model.config
    scale = config.sampler.get("cfg_scale")
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    times = []
    first = True
    for b, idx in enumerate(tqdm(mine, desc="batches", disable=len(mine) < 2 or not distributed.is_main())):
        padded = np.resize(idx, bs)  # the last batch repeats indices so every batch compiles to one shape
        noise = parallel.shard_batch(sample_noise(config.seed, padded, shape), mesh)
        yb = None if labels is None else labels[padded]
        key = sample_step_keys(config.seed, padded) if sampler.draws_noise else None
        run = lambda: sampler(noise, yb, schedule, key=key, cfg_scale=scale)  # noqa: E731
        runs = 1 + (int(config.get("repeats", 0)) if b == 0 else 0)
        for r in range(runs):
            with phases("sample" if aot or not first else "compile"):
                t0 = time.perf_counter()
                lat = run()
                lat.block_until_ready()
                dt = time.perf_counter() - t0
            if b == 0 and r == 0 and not bool(jnp.isfinite(lat).all()):  # one cheap check, before any write
                how = what + (", " + schedule.describe() if schedule.masks is not None else "") + (
                    f", cfg_scale {scale}" if scale is not None else "")
                raise SamplingError(f"the first batch sampled NaN or inf values ({how}); nothing was written")
            if not (b == 0 and r == 0 and runs > 1):  # the very first run includes compilation
                times.append(dt)
            first = False
        release_free_heap()  # the sampler's cache and history, freed with its call, before the decoder's buffers
        with phases("decode"):
            imgs = vae.decode(lat / config.vae.get("scale", 0.18215)) if vae is not None else lat
            store.write(idx, imio.to_uint8(np.asarray(imgs))[:len(idx)])
        del lat, imgs
        release_free_heap()  # the decoder's first compile and its full-resolution activations
    return times


def _write_outputs(config, workdir, report, model, made, store, n, bs, sampled, times, phases, aot) -> dict:
    """Process 0, every image in the shards: the grid, the npz, the scores, `report.json` and the summary."""
    sampler, schedule, what, of_what = made
    cached = schedule.masks is not None
    share = sampler.computed_share(schedule) * sampler.rows / (schedule.reference_steps or sampler.rows)
    grid_path = os.path.join(workdir, config.get("grid", "samples.png"))
    imio.save_png(grid_path, imio.make_grid(store.read(np.arange(min(n, config.get("grid_max", 64)))), nrow=8),
                  upscale=config.get("grid_upscale", 1))
    npz_path = None
    ev = config.get("evaluate")
    scoring = bool(ev is not None and ev.get("reference"))
    if _npz_path(config, workdir):
        npz_path = store.assemble(_npz_path(config, workdir))
    store.remove()  # the job is done: its images are in the npz (or were not asked for)
    metrics = None
    if scoring:
        from l2c_jax.eval.evaluator import evaluate

        with phases("evaluate"):
            metrics = evaluate(npz_path, ev.reference, ev.get("inception"), batch_size=int(ev.get("batch_size", 64)))

    t = np.asarray(times)
    timed = len(t) > 0
    history = history_report(sampler, schedule, bs)
    result = dict(latency_mean=float(t.mean()) if timed else None, latency_std=float(t.std()) if timed else None,
                  computed_share=share, flop_bound=flop_bound_of(model, sampler, schedule), num_images=n,
                  sampled=sampled, processes=jax.process_count(), grid=grid_path, npz=npz_path,
                  batch_size=bs, steps=sampler.rows, router=cached, schedule=schedule.describe(),
                  forecast=schedule.forecast, history_bytes=history["kept"],
                  anchors=None if schedule.anchors is None else [int(a) for a in np.flatnonzero(schedule.anchors)],
                  history_bytes_all_units=history["all_units"], phases=phases.summary(), metrics=metrics)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    where = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if timed:
        label = ("L2C" if schedule.method == "l2c" else schedule.describe()) + (
            f" ({schedule.forecast})" if schedule.forecasts else "")
        report(f"sampled {n} images{where}, {what}{' + ' + label if cached else ''}, batch {bs}: "
               f"{t.mean():.3f}±{t.std():.3f} s per batch "
               f"({len(t)} timed run{'s' if len(t) != 1 else ''}, compile excluded where repeats > 0)")
    else:
        report(f"all {n} images were sampled before this run; nothing left to sample")
    report(f"sub-layers computed: {share * 100:.2f}% of {of_what}")
    if schedule.forecasts and schedule.anchors is not None:  # placed or searched: where the full steps went
        report(f"full steps (anchors of the forecast): {','.join(map(str, np.flatnonzero(schedule.anchors)))}")
    if schedule.forecasts:
        report(f"forecast history ({schedule.forecast}): {history['kept'] / 2**20:.1f} MiB at its peak, against "
               f"{history['all_units'] / 2**20:.1f} MiB for (value, d1, d2) of every unit in float32")
    report(f"wrote {grid_path}" + (f" and {npz_path}" if npz_path else ""))
    if metrics is not None:  # the ADM evaluator's lines, against config.evaluate.reference
        for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
            report(f"{name}: {metrics[name]}")
    report("phases (wall time, peak resident memory" + (", process 0" if where else "") + ")"
           + ("" if aot else "; compile = first run, with compilation") + ":")
    for line in phases.lines():
        report("  " + line)
    return result


def history_report(sampler, schedule, batch: int) -> dict:
    """{kept, all_units}: the forecast history's peak bytes for `batch` images (0 for families without one)."""
    fn = getattr(sampler, "history_bytes", None)
    return fn(schedule, batch) if fn is not None else dict(kept=0, all_units=0)


def flop_bound_of(model, sampler, schedule) -> Optional[float]:
    """Full FLOPs over the schedule's (the always-computed parts included), counted per model evaluation."""
    from l2c_jax.bench.flops import flop_bound

    if schedule.masks is None:
        ref = schedule.reference_steps or sampler.rows
        return float(ref / sampler.rows)
    masks = sampler.evaluation_masks(schedule.masks)
    return float(flop_bound(model.config, masks, masks.shape[0])["bound_with_fixed"])


def timed(fn, repeats: int):
    """Median and spread of `repeats` runs after one warm-up (compilation) run; returns (result, median, std)."""
    out = fn()
    jax.block_until_ready(out)
    ts = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    return out, float(np.median(ts)), float(np.std(ts))
