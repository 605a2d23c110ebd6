"""End-to-end jobs behind the scripts: `run_sampling(config, workdir)`.

Loads the converted model (DiT with DDIM/DDPM, or U-ViT with DPM-Solver),
router and VAE named by the config, samples the requested labels (none for
an unconditional U-ViT) in batches (data-parallel over local devices), decodes,
writes a PNG grid and optionally the ADM evaluator's npz, and reports the
latency per batch and the schedule's share of computed sub-layers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax import images as imio
from l2c_jax.errors import ConfigError
from l2c_jax.retarget import retarget
from l2c_jax.sampling.draws import draw_labels, sample_noise, sample_step_keys

log = logging.getLogger(__name__)


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
    """(sampler, masks or None, computed share, what it runs, what the share is of).

    The sampler is the model's own (`l2c_jax.sampling.sampler_for`), so every
    batch, and every later job on the same model, reuses its compiled steps.
    """
    from l2c_jax.sampling import is_guided, router_masks, sampler_class, sampler_for

    sc = config.sampler
    thr = config.router.get("threshold") if config.get("router") is not None else None
    cls = sampler_class(model.family)
    sampler = sampler_for(model, sc.get("name", cls.solvers[0]), int(sc.steps),
                          is_guided(model.family, sc.get("cfg_scale")), config.get("strategy", "static"),
                          cache_dtype=config.get("cache_dtype") or None, **cls.options_from_config(sc))
    if router is not None and config.router.get("retarget"):  # a router of another step count: interpolated rows
        router = retarget(router, sampler.rows, sc.get("skip_type", "time_uniform"))
    masks = sampler.check_router_masks(router_masks(model, router, thr, sampler.rows) if router else None)
    what, of_what = sampler.describe()
    # A router trained with forecasts samples with them (only DiT routers have any).
    forecast = {} if router is None or router.forecast == "copy" else {"forecast": router.forecast}
    return sampler, masks, sampler.computed_share(masks), what, of_what, forecast


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
    phases = Phases()
    try:
        with phases("load"):
            mesh = parallel.local_mesh()  # sampling needs no other process: each runs its own batches
            model, router, vae = load_for_sampling(config, mesh)
            made = _make_sampler(model, router, config)
        return _sample_batches(config, workdir, report, model, vae, made, phases, mesh)
    finally:
        phases.close()


def _sample_batches(config, workdir, report, model, vae, made, phases, mesh) -> dict:
    from tqdm.auto import tqdm

    from l2c_jax import distributed, parallel
    from l2c_jax.memory import release_free_heap
    from l2c_jax.shards import ShardStore, batches_of, job_fingerprint

    sampler, masks, share, what, of_what, forecast = made
    cfg = model.config
    if not cfg.conditional:
        n = int(config.get("num_samples") or len(config.get("labels") or ()))
        if n <= 0:
            raise ConfigError("set num_samples (this model is unconditional: labels are ignored)")
        labels = None
    else:
        labels = sample_labels(config, cfg.null_class)  # the classes below the null class
        n = len(labels)
    bs = int(config.batch_size)
    if bs < 1:
        raise ConfigError(f"batch_size must be positive, got {bs}")
    workdir = workdir or config.get("workdir") or "."
    os.makedirs(workdir, exist_ok=True)
    store = ShardStore(os.path.join(workdir, "shards"), job_fingerprint(config), n)
    if distributed.is_main():
        store.prepare()
    distributed.barrier("l2c-shards-prepared")
    store.check()
    remaining = store.remaining()
    distributed.barrier("l2c-shards-scanned")  # every process dealt the same remaining indices
    mine = batches_of(remaining, bs, jax.process_index(), jax.process_count())
    if len(remaining) < n:
        report(f"resuming: {n - len(remaining)} of {n} images are already in {store.directory}")
    scale = config.sampler.get("cfg_scale")
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    aot = mesh.devices.size == 1 and sampler.compile_ahead and bool(mine)
    if aot:  # every graph of the schedule, compiled ahead and in parallel
        with phases("compile"):
            sampler.compile(bs, masks)

    times = []
    first = True
    for b, idx in enumerate(tqdm(mine, desc="batches", disable=len(mine) < 2 or not distributed.is_main())):
        padded = np.resize(idx, bs)  # the last batch repeats indices so every batch compiles to one shape
        noise = parallel.shard_batch(sample_noise(config.seed, padded, shape), mesh)
        yb = None if labels is None else labels[padded]
        key = sample_step_keys(config.seed, padded) if sampler.draws_noise else None
        run = lambda: sampler(noise, yb, masks, key=key, cfg_scale=scale, **forecast)  # noqa: E731
        runs = 1 + (int(config.get("repeats", 0)) if b == 0 else 0)
        for r in range(runs):
            with phases("sample" if aot or not first else "compile"):
                t0 = time.perf_counter()
                lat = run()
                lat.block_until_ready()
                dt = time.perf_counter() - t0
            if not (b == 0 and r == 0 and runs > 1):  # the very first run includes compilation
                times.append(dt)
            first = False
        with phases("decode"):
            imgs = vae.decode(lat / config.vae.get("scale", 0.18215)) if vae is not None else lat
            store.write(idx, imio.to_uint8(np.asarray(imgs))[:len(idx)])
        del lat, imgs
        release_free_heap()  # the decoder's first compile and its full-resolution activations
    distributed.barrier("l2c-shards-written")
    if not distributed.is_main():
        return dict(num_images=n, sampled=int(sum(len(i) for i in mine)), process=jax.process_index())

    grid_path = os.path.join(workdir, config.get("grid", "samples.png"))
    imio.save_png(grid_path, imio.make_grid(store.read(np.arange(min(n, config.get("grid_max", 64)))), nrow=8),
                  upscale=config.get("grid_upscale", 1))
    npz_path = None
    ev = config.get("evaluate")
    scoring = bool(ev is not None and ev.get("reference"))
    if config.get("npz") or scoring:
        npz_path = store.assemble(os.path.join(workdir, config.get("npz") or "samples.npz"))
    store.remove()  # the job is done: its images are in the npz (or were not asked for)
    metrics = None
    if scoring:
        from l2c_jax.eval.evaluator import evaluate

        with phases("evaluate"):
            metrics = evaluate(npz_path, ev.reference, ev.get("inception"), batch_size=int(ev.get("batch_size", 64)))

    t = np.asarray(times)
    timed = len(t) > 0
    result = dict(latency_mean=float(t.mean()) if timed else None, latency_std=float(t.std()) if timed else None,
                  computed_share=share, num_images=n, sampled=int(sum(len(i) for i in mine)),
                  processes=jax.process_count(), grid=grid_path, npz=npz_path, batch_size=bs, steps=sampler.rows,
                  router=masks is not None, phases=phases.summary(), metrics=metrics)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    where = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if timed:
        report(f"sampled {n} images{where}, {what}{' + L2C' if masks is not None else ''}, batch {bs}: "
               f"{t.mean():.3f}±{t.std():.3f} s per batch "
               f"({len(t)} timed run{'s' if len(t) != 1 else ''}, compile excluded where repeats > 0)")
    else:
        report(f"all {n} images were sampled before this run; nothing left to sample")
    report(f"sub-layers computed: {share * 100:.2f}% of {of_what}")
    report(f"wrote {grid_path}" + (f" and {npz_path}" if npz_path else ""))
    if metrics is not None:  # the ADM evaluator's lines, against config.evaluate.reference
        for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
            report(f"{name}: {metrics[name]}")
    report("phases (wall time, peak resident memory" + (", process 0" if where else "") + ")"
           + ("" if aot else "; compile = first run, with compilation") + ":")
    for line in phases.lines():
        report("  " + line)
    return result


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


def run_compare(config, workdir: Optional[str] = None, report=print) -> list:
    """Full DDIM vs DDIM + L2C vs DDIM with fewer steps at L2C's latency, from the same noise.

    Reports, in the paper's form, latency, share of sub-layers computed, FID
    (in the feature space `config.eval.features` names) and fidelity to the
    full sampler (PSNR), and writes a side-by-side PNG.
    """
    from l2c_jax.eval.fid import psnr
    from l2c_jax.sampling import is_guided, computed_share, router_masks, sampler_for

    model, router, _ = load_for_sampling(config)
    if router is None:
        raise ConfigError("compare needs config.router.checkpoint")
    sc = config.sampler
    steps = int(sc.steps)
    gc = sc.get("guidance_channels", 3)
    guided = is_guided(model.family, sc.get("cfg_scale"))
    scale = sc.get("cfg_scale") if guided else None
    full = functools.partial(sampler_for(model, sc.get("name", "ddim"), steps, guided, "static",
                                         guidance_channels=gc), cfg_scale=scale)
    masks = router_masks(model, router, config.router.get("threshold"), steps)
    n = int(config.eval.num_samples)
    cfg = model.config
    y = np.arange(n) % cfg.num_classes
    noise = jax.random.normal(jax.random.key(config.seed), (n, cfg.input_size, cfg.input_size, cfg.in_channels))
    reps = int(config.get("repeats", 3))

    x_full, t_full, s_full = timed(lambda: full(noise, y), reps)
    x_l2c, t_l2c, s_l2c = timed(lambda: full(noise, y, masks), reps)
    # The honest baseline: plain DDIM given the time L2C takes (or config.compare_steps steps).
    k = int(config.get("compare_steps", 0) or 0) or max(2, int(round(steps * t_l2c / t_full)))
    fewer = functools.partial(sampler_for(model, sc.get("name", "ddim"), k, guided, "static", guidance_channels=gc),
                              cfg_scale=scale)
    x_few, t_few, s_few = timed(lambda: fewer(noise, y), reps)

    feats = None
    if config.eval.get("features") == "digits":
        from l2c_jax.eval.digits_classifier import DigitFeatures
        feats = DigitFeatures()
    rows = []
    for name, x, t, s, nfe, share in [
        (f"DDIM {steps}", x_full, t_full, s_full, steps, 1.0),
        (f"DDIM {steps} + L2C", x_l2c, t_l2c, s_l2c, steps, computed_share(masks, steps, model.num_units)),
        (f"DDIM {k} (L2C's latency)", x_few, t_few, s_few, k, 1.0),
    ]:
        imgs = np.clip(np.asarray(x), -1, 1)
        rows.append(dict(method=name, nfe=nfe, latency=t, latency_std=s, computed=share,
                         fid=feats.fid_to_data(imgs) if feats else None,
                         psnr_to_full=psnr(imgs, np.clip(np.asarray(x_full), -1, 1))))
    workdir = workdir or config.get("workdir") or "."
    os.makedirs(workdir, exist_ok=True)
    show = [imio.to_uint8(np.asarray(x)[: cfg.num_classes]) for x in (x_full, x_l2c, x_few)]
    png = os.path.join(workdir, config.get("grid", "compare.png"))
    imio.save_png(png, imio.make_grid(np.concatenate(show), nrow=cfg.num_classes, padding=1),
                  upscale=config.get("grid_upscale", 8))
    report(f"{n} samples, batch {n}, CFG {sc.get('cfg_scale')}, {jax.devices()[0].platform}; rows of {png}: "
           f"DDIM {steps} | DDIM {steps} + L2C | DDIM {k}")
    report(f"{'method':<26}{'latency (s)':>16}{'computed':>10}{'FID':>9}{'PSNR vs full':>14}")
    for r in rows:
        fid_s = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        ps = "inf" if not np.isfinite(r["psnr_to_full"]) else f"{r['psnr_to_full']:.1f} dB"
        report(f"{r['method']:<26}{r['latency']:>9.3f} ±{r['latency_std']:.3f}{r['computed'] * 100:>9.1f}%"
               f"{fid_s:>9}{ps:>14}")
    report(f"L2C speed-up {t_full / t_l2c:.2f}x over DDIM {steps}")
    if feats is not None:
        report(f"FID: features of the project's digit classifier ({feats.accuracy * 100:.1f}% held-out accuracy) "
               f"against all 1797 digits")
    narrow = config.get("compare_cache_dtype")
    if narrow:  # what a narrower feature cache costs: the same L2C run, only the carried cache rounded
        lean = sampler_for(model, sc.get("name", "ddim"), steps, guided, "static", guidance_channels=gc,
                           cache_dtype=narrow)
        x_lean = np.clip(np.asarray(lean(noise, y, masks, cfg_scale=scale)), -1, 1)
        l2c_imgs = np.clip(np.asarray(x_l2c), -1, 1)
        rows.append(dict(method=f"DDIM {steps} + L2C, {narrow} cache", nfe=steps, computed=rows[1]["computed"],
                         fid=feats.fid_to_data(x_lean) if feats else None,
                         psnr_to_full=psnr(x_lean, np.clip(np.asarray(x_full), -1, 1)),
                         psnr_to_float32_cache=psnr(x_lean, l2c_imgs)))
        r = rows[-1]
        report(f"{narrow} feature cache: PSNR {r['psnr_to_float32_cache']:.1f} dB to the float32-cache L2C images, "
               f"{r['psnr_to_full']:.1f} dB to full DDIM {steps}"
               + (f", FID {r['fid']:.2f}" if r["fid"] is not None else ""))
    return rows
