"""Image-free router training data: the model's own sampling trajectories.

HarmoniCa (ICML 2025) trains its router on states the model itself visits
while sampling, with no images. Here the states come from the project's own
full sampler (`l2c_jax.sampling`, every sub-layer computed, the router's
solver and step count): trajectory i starts from noise (seed, i) and label
(seed, i) (`l2c_jax.sampling.draws`) and records the state every step starts
from, in sampling order (DiT DDIM: `steps` states; U-ViT DPM-Solver-2: one per
solver step, NFE // 2). The router loss then starts from a recorded state
instead of a noised image (`l2c_jax.training.losses`).

On disk (a directory, `data.trajectories`):
  states.npy   (N, S, H, W, C) float32
  labels.npy   (N,) int64 (0 for an unconditional model)
  trajectories.json  what recorded them (model, sampler, guidance, count, seed)
Recording is resumable: the files stay `*.partial` with a per-batch done flag
until the last batch is written, and an interrupted run goes on where it
stopped. With several processes each records every P-th pending batch into
the same files (a filesystem all processes share), process 0 finishes them.
"""

from __future__ import annotations

import json
import os
import time
import jax
import numpy as np

from l2c_jax import distributed, parallel
from l2c_jax.errors import ConfigError
from l2c_jax.model import model_from_config
from l2c_jax.sampling import is_guided, sampler_class, sampler_for
from l2c_jax.sampling.draws import draw_labels, sample_noise, sample_step_keys

__all__ = ["TrajectorySource", "record_trajectories", "trajectory_spec", "trajectories_dir"]

META = "trajectories.json"


def trajectories_dir(config, workdir: str) -> str:
    """The directory data.trajectories names ("workdir": WORKDIR/trajectories)."""
    where = str(config.data.get("trajectories") or "")
    if not where:
        raise ConfigError("data.trajectories is empty: image-free training needs a directory (or 'workdir')")
    images = [k for k in ("latents", "image_folder", "tfds_name") if config.data.get(k)]
    if images:
        raise ConfigError(f"data.trajectories trains without images, but data.{images[0]} is set too: "
                          "unset one of them")
    return os.path.join(workdir, "trajectories") if where == "workdir" else where


def trajectory_spec(config) -> dict:
    """What identifies a set of trajectories: recordings with another spec are not reused."""
    mc = config.model.to_dict()
    if not mc.get("random_init") and mc.get("checkpoint"):
        mc["checkpoint"] = os.path.abspath(mc["checkpoint"])
    else:
        mc.pop("checkpoint", None)
    dc = config.data
    scale = dc.get("trajectory_cfg_scale")
    return json.loads(json.dumps(dict(
        model=mc, sampler=config.sampler.to_dict(), cfg_scale=None if scale is None else float(scale),
        count=int(dc.get("num_trajectories") or 0), seed=int(dc.get("trajectory_seed") or 0),
    ), default=str))


class TrajectorySource:
    """Recorded trajectories as a training source: item i is (states (S,H,W,C), label)."""

    kind = "trajectories"

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, META)
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{directory}: no {META} (record trajectories with an image-free router config)")
        with open(meta_path) as f:
            self.meta = json.load(f)
        try:
            self.states = np.load(os.path.join(directory, "states.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(directory, "labels.npy"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{directory}: unreadable trajectories ({e})") from None
        if self.states.ndim != 5 or len(self.states) != len(self.labels):
            raise ConfigError(f"{directory}: states {self.states.shape} and labels {self.labels.shape} do not "
                              "pair up as (N, steps, H, W, C) and (N,)")

    def __len__(self):
        return len(self.labels)

    def load(self, index: int):
        return np.asarray(self.states[index], np.float32), int(self.labels[index])


def _sampler(model, config):
    sc, cls = config.sampler, sampler_class(model.family)
    scale = config.data.get("trajectory_cfg_scale")
    guided = is_guided(model.family, scale)
    sampler = sampler_for(model, sc.get("name", cls.solvers[0]), int(sc.steps), guided, "auto",
                          **cls.options_from_config(sc))
    return sampler, (float(scale) if guided else None)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def record_trajectories(config, directory: str, model=None, report=print) -> str:
    """Records (or finishes recording) the trajectories data.* asks for into `directory`; returns it.

    A directory that already holds them is used as it is; one holding
    trajectories of another model, sampler, guidance, count or seed is an error.
    """
    from tqdm.auto import tqdm

    report = distributed.main_only(report)
    spec = trajectory_spec(config)
    n = spec["count"]
    if n < 1:
        raise ConfigError(f"data.num_trajectories must be positive, got {n}")
    meta_path = os.path.join(directory, META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
        if have.get("spec") != spec:
            raise ConfigError(f"{directory} holds trajectories recorded otherwise "
                              f"({_differences(have.get('spec', {}), spec)}); remove it or set data.trajectories")
        report(f"using {have['count']} trajectories in {directory}")
        return directory

    if model is None or jax.process_count() > 1:  # sampling needs no other process: a copy on this one's devices
        model = model_from_config(config.model, mesh=parallel.local_mesh())
    mesh = parallel.local_mesh()
    sampler, scale = _sampler(model, config)
    cfg = model.config
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    # States per trajectory: one per solver step (U-ViT's DPM-Solver-2 takes NFE // 2).
    steps = int(sampler.num_steps if hasattr(sampler, "num_steps") else sampler.steps)
    bs = int(config.data.get("trajectory_batch_size") or 64)
    if bs < 1:
        raise ConfigError(f"data.trajectory_batch_size must be positive, got {bs}")
    batches = [np.arange(s, min(s + bs, n)) for s in range(0, n, bs)]
    part = {name: os.path.join(directory, f"{name}.npy.partial") for name in ("states", "labels", "done")}
    part_meta = os.path.join(directory, "trajectories.partial.json")
    if distributed.is_main():
        os.makedirs(directory, exist_ok=True)
        fresh = True
        if os.path.isfile(part_meta) and all(os.path.isfile(p) for p in part.values()):
            with open(part_meta) as f:
                fresh = json.load(f) != dict(spec=spec, batch_size=bs)
        if fresh:  # nothing to resume, or a recording of another setting: start over
            for name, (shp, dtype) in dict(states=((n, steps) + shape, np.float32), labels=((n,), np.int64),
                                           done=((len(batches),), np.bool_)).items():
                np.lib.format.open_memmap(part[name], mode="w+", dtype=dtype, shape=shp).flush()
            with open(part_meta, "w") as f:
                json.dump(dict(spec=spec, batch_size=bs), f)
    distributed.barrier("l2c-trajectories-created")
    states = np.lib.format.open_memmap(part["states"], mode="r+")
    labels = np.lib.format.open_memmap(part["labels"], mode="r+")
    done = np.lib.format.open_memmap(part["done"], mode="r+")
    pending = [b for b in range(len(batches)) if not done[b]]
    distributed.barrier("l2c-trajectories-scanned")  # every process dealt the same pending batches
    if len(pending) < len(batches):
        report(f"resuming: {len(batches) - len(pending)} of {len(batches)} trajectory batches are recorded")
    else:
        report(f"recording {n} trajectories ({steps} states each, {sampler.describe()[0]}"
               f"{'' if scale is None else f', guidance {scale}'}) into {directory}")
    seed = spec["seed"]
    t0 = time.perf_counter()
    mine = pending[jax.process_index()::jax.process_count()]
    for b in tqdm(mine, desc="trajectories", disable=not distributed.is_main() or len(mine) < 2):
        idx = batches[b]
        padded = np.resize(idx, bs)  # one shape for every batch: one compiled program
        y = draw_labels(seed, padded, cfg.null_class) if cfg.conditional else np.zeros((bs,), np.int64)
        key = sample_step_keys(seed, padded) if sampler.draws_noise else None
        recorded = []
        sampler(parallel.shard_batch(sample_noise(seed, padded, shape), mesh),
                y if cfg.conditional else None, None, key=key, cfg_scale=scale,
                on_state=lambda s, x: recorded.append(np.asarray(x)))
        if len(recorded) != steps:  # the sampler and the recorder disagree: a bug, not bad input
            raise AssertionError(f"recorded {len(recorded)} states of a {steps}-step sampler")
        states[idx[0]:idx[-1] + 1] = np.stack(recorded, 1)[:len(idx)]
        labels[idx[0]:idx[-1] + 1] = y[:len(idx)]
        states.flush()
        labels.flush()
        done[b] = True  # only after the batch is on disk
        done.flush()
    del states, labels, done
    distributed.barrier("l2c-trajectories-written")
    if distributed.is_main():
        os.replace(part["states"], os.path.join(directory, "states.npy"))
        os.replace(part["labels"], os.path.join(directory, "labels.npy"))
        with open(meta_path + ".tmp", "w") as f:
            json.dump(dict(spec=spec, count=n, steps=steps, shape=list(shape)), f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
        for p in (part["done"], part_meta):
            os.remove(p)
    distributed.barrier("l2c-trajectories-finished")
    report(f"recorded {n} trajectories into {directory} in {time.perf_counter() - t0:.1f} s")
    return directory

