"""`scripts/benchmark.py` (mode "schedules"): measured speed-up of several cache schedules against full sampling,
side by side in one run, beside each schedule's FLOP bound.

Every schedule (`config.schedules`: caching methods by name and setting, `l2c_jax.methods`, each also with its
history in every dtype of `config.history_dtypes` where it forecasts) is compiled and run once untimed; then
`config.repeats` rounds time full sampling and every schedule in turn, the order reversed every other round, so
a drifting machine load biases none of them. Reported per schedule: computed share, FLOP bound (the
always-computed parts included), median latency, speed-up over full's median, speed-up over bound, and its
forecast history (peak bytes, beside all-units float32). The row goes to `config.output` (JSON lines).
"""

from __future__ import annotations

import datetime
import time
from typing import Callable

import numpy as np

from l2c_jax.bench.harness import build_model, compilation_cache_of, machine_info, write_row
from l2c_jax.errors import ConfigError


def run_schedules_benchmark(config, report: Callable = print, argv=None) -> dict:
    import jax

    from l2c_jax.bench.flops import flop_bound
    from l2c_jax.sampling import calibration_labels, resolve_schedule, sampler_class, sampler_for
    from l2c_jax.sampling.draws import sample_noise

    compilation_cache_of(config)
    model = build_model(config, families=("dit", "uvit"))
    cfg = model.config
    sc = config.sampler
    steps, batch, repeats = int(sc.steps), int(config.batch_size), int(config.get("repeats", 3))
    if repeats < 1 or batch < 1:
        raise ConfigError("repeats and batch_size must be at least 1")
    strategy = config.get("strategy", "static")
    noise = sample_noise(int(config.get("seed", 0)), np.arange(batch), (cfg.input_size, cfg.input_size, cfg.in_channels))
    y = calibration_labels(cfg, batch)
    family = sampler_class(model.family)
    options = family.options_from_config(sc)

    def sampler(k, history_dtype=None):
        return sampler_for(model, sc.get("name", family.default_solver), k, False, strategy, **options,
                           **({"history_dtype": history_dtype} if history_dtype else {}))

    full = sampler(steps)
    runs = {"full": (full, None, None)}
    routers = dict(config.get("routers") or {})
    for spec in config.schedules:
        sched = resolve_schedule(model, full, spec, routers=routers, threshold=config.get("threshold"))
        dtypes = [None] + (list(config.get("history_dtypes") or ()) if sched.forecasts else [])
        for hd in dtypes:
            runs[spec + (f" (history {hd})" if hd else "")] = (sampler(sched.steps or steps, hd), sched, hd)
    report(f"machine: {machine_info()['cpu']}; {len(runs) - 1} schedules against full, batch {batch}, "
           f"{steps} steps, strategy {strategy}, {repeats} interleaved rounds")
    for name, (smp, sched, _) in runs.items():  # compile and warm every one before any timing
        jax.block_until_ready(smp(noise, y, sched))
    times = {name: [] for name in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            smp, sched, _ = runs[name]
            t0 = time.perf_counter()
            jax.block_until_ready(smp(noise, y, sched))
            times[name].append(time.perf_counter() - t0)
    t_full = float(np.median(times["full"]))
    rows = []
    report(f"{'schedule':<44}{'computed':>9}{'bound':>8}{'latency':>10}{'speed-up':>10}{'/bound':>8}{'history':>20}")
    for name, (smp, sched, hd) in runs.items():
        t = float(np.median(times[name]))
        if sched is None or sched.masks is None:
            bound = 1.0 if sched is None else steps / sched.steps
        else:
            bound = float(flop_bound(cfg, sched.masks, sched.steps)["bound_with_fixed"])
        hist = smp.history_bytes(sched, batch)
        share = 1.0 if sched is None else sched.computed_share
        rows.append(dict(schedule=name, computed_share=share, flop_bound=bound, latency=t,
                         times=[round(x, 4) for x in times[name]], speedup=t_full / t,
                         speedup_over_bound=t_full / t / bound, history_dtype=hd or "float32",
                         history_bytes=hist["kept"], history_bytes_all_units=hist["all_units"]))
        h = f"{hist['kept'] / 2**20:.0f} / {hist['all_units'] / 2**20:.0f} MiB" if hist["all_units"] else "-"
        report(f"{name:<44}{share * 100:>8.1f}%{bound:>7.2f}x{t:>9.2f}s{t_full / t:>9.2f}x{t_full / t / bound:>8.2f}"
               f"{h:>20}")
    row = dict(name=config.get("name", "schedules"), mode="schedules",
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               command=" ".join(["python", "scripts/benchmark.py"] + list(argv or [])), machine=machine_info(),
               steps=steps, batch_size=batch, strategy=strategy, repeats=repeats, full_latency=t_full, rows=rows)
    return write_row(config, row, report)
