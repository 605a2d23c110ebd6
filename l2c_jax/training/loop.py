"""The training loop router training and DiT training share: `train_loop`.

What stays with each job: the state pytree (a dict with an integer "step"
leaf), the jitted step `(state, batch) -> (state, metrics)`, the objective,
what it reports at each log and what it writes at the end. What lives here:

- checkpoints: an orbax CheckpointManager in WORKDIR/checkpoints holding the
  state (StandardSave / StandardRestore, restored straight into the state's
  placement on the mesh) and the data iterator's position (JsonSave /
  JsonRestore); a rerun resumes from the latest one. Every random draw of
  step s is the job's fold_in(seed, s), so a resumed run continues exactly
  as an uninterrupted one. Only a finite state is ever saved.
- SIGTERM and Ctrl-C stop the run at the next step boundary, save a
  checkpoint there, restore the previous handlers and raise
  KeyboardInterrupt; rerunning the same command resumes.
- a non-finite loss (or state) raises `TrainingDiverged`, naming the steps
  and the last good checkpoint, which is kept.
- JAX's persistent compilation cache is on (`l2c_jax.compile_cache`), so a
  resumed run does not compile its step again.
- metrics averaged over `log_every` steps plus steps_per_sec go to the
  metric writer (`metric_writer`: TensorBoard when TensorFlow is installed,
  WORKDIR/metrics.jsonl otherwise) and to the job's `on_log` hook.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from l2c_jax import compile_cache, parallel
from l2c_jax.errors import ConfigError, L2CError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(L2CError):
    """The loss or the trained parameters became NaN or infinite."""


# ---------------------------------------------------------------------------
# Metric writers
# ---------------------------------------------------------------------------

class JsonLinesWriter:
    """A metric writer that needs no TensorFlow: one JSON object per `write_scalars` call.

    `clu.metric_writers` (its LoggingWriter included) imports TensorFlow on
    import, so this stands in for the whole clu writer. Lines are appended,
    so a resumed run continues the file of the interrupted one. Images are
    not stored (the jobs save what they show as files of their own); every
    call is also logged at INFO. `path` None: logging only.
    """

    def __init__(self, path: Optional[str]):
        self.path = path
        self._f = open(path, "a") if path else None

    def write_scalars(self, step: int, scalars) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._f is not None:
            self._f.write(json.dumps(dict(step=int(step), **values)) + "\n")

    def write_images(self, step: int, images) -> None:
        log.info("[%d] images: %s", step, ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in images.items()))

    def write_hparams(self, hparams) -> None:
        log.info("hparams: %s", hparams)

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def tensorflow_available() -> bool:
    """Whether TensorFlow and clu's writers (the `data` extra) can be imported, without importing them."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "clu"))
    except (ImportError, ValueError):  # a stub in sys.modules without a spec
        return False


def metric_writer(workdir: str, *, just_logging: bool = False):
    """TensorBoard event files in `workdir` (plus logging) through clu when TensorFlow is
    installed; otherwise a `JsonLinesWriter` on WORKDIR/metrics.jsonl."""
    if tensorflow_available():
        from clu import metric_writers

        return metric_writers.create_default_writer(workdir, just_logging=just_logging)
    return JsonLinesWriter(None if just_logging else os.path.join(workdir, METRICS_FILE))


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

# What a resumed run may change: how far it goes and how it logs. Anything else (seed, L1 weight, data,
# step count of the sampler) would mix two configs in one router.
RESUMABLE = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, now: dict) -> list:
    """The dotted keys whose values differ between two config dicts, beyond those a resume may change."""
    a, b = _flat(saved), _flat(now)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in RESUMABLE)


def _has_checkpoint(workdir: str) -> bool:
    d = os.path.join(workdir, CHECKPOINT_DIR)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def prepare_workdir(config, workdir: str, kind: str) -> None:
    """Refuses a workdir that is not this training job's, then writes the run's config to WORKDIR/config.json.

    Refused before any work, with nothing changed: a model directory or another kind of job's workdir
    (`l2c_jax.workdirs.claim`), a config.json no training job wrote, and a resume (a checkpoint exists) whose
    config differs from the saved one in anything but RESUMABLE, naming the keys. Process 0 only.
    """
    from l2c_jax import workdirs

    path = os.path.join(workdir, "config.json")
    fresh = workdirs.read_record(workdir) is None if os.path.isdir(workdir) else True
    if fresh and os.path.exists(path) and not _has_checkpoint(workdir) and not workdirs.is_model_dir(workdir):
        raise ConfigError(f"--workdir {workdir} holds a config.json no training job wrote; give the {kind} job a "
                          "directory of its own (nothing was changed)")
    workdirs.claim(workdir, kind)
    now = json.loads(config.to_json_best_effort(sort_keys=True))
    if _has_checkpoint(workdir) and os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); the checkpoints cannot be matched to a config") from None
        changed = config_changes(saved, now)
        if changed:
            shown = ", ".join(f"{k} ({_flat(saved).get(k, '<absent>')!r} -> {_flat(now).get(k, '<absent>')!r})"
                              for k in changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ConfigError(f"{workdir} holds the checkpoints of a run with another config: {shown}; resume "
                              f"with the saved config (only {', '.join(RESUMABLE)} may change) or use another "
                              "--workdir (nothing was changed)")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(now, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def training_workdir(config, workdir: str, kind: str):
    """Holds WORKDIR's lock for the block (process 0), after `prepare_workdir`; refusals reach every process."""
    from l2c_jax import distributed, workdirs

    with contextlib.ExitStack() as held:
        def claim():
            held.enter_context(workdirs.lock(workdir))
            prepare_workdir(config, workdir, kind)

        distributed.on_main(claim, "training workdir")
        yield


@jax.jit
def _all_finite(tree):
    # On the devices: a DiT's state is several copies of its weights, too big to fetch per checkpoint.
    checks = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def all_finite(tree) -> bool:
    return bool(_all_finite(tree))


class _StopSignals:
    """SIGTERM and SIGINT set a flag the loop checks between steps (a step is never cut in
    half, so the state and the data position saved belong together)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict = {}

    def __enter__(self):
        # Python delivers signals to the main thread only; elsewhere the caller's handlers stay.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received.append(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False


def _last_good(mngr) -> str:
    latest = mngr.latest_step()
    if latest is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {latest}) is kept"


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop(init_state: Callable[[], Any], step_fn: Callable, batches, mesh, *, workdir: str, total_steps: int,
               log_every: int, checkpoint_every: int, keep_checkpoints: int,
               on_log: Optional[Callable[[int, Any, dict, Any], Optional[dict]]] = None,
               hint: str = "", report=print) -> tuple[Any, list[dict]]:
    """Runs (or resumes) `step_fn` until `total_steps`; returns (placed final state, log history).

    init_state: () -> the initial state pytree (a dict with an integer "step"),
    called only when WORKDIR/checkpoints holds no checkpoint; otherwise only its
    shapes are traced (`jax.eval_shape`) and the latest checkpoint is restored
    into them, so a resumed run never holds a second, fresh state. step_fn:
    (state, batch) -> (state, metrics dict of scalars), typically jitted with the
    state donated. batches: an iterator of host batches with `batch_size`, `state()`
    and `restore()` (`l2c_jax.training.data.Batches`); each batch is split over
    `mesh`'s data axis. on_log(step, state, averaged metrics, writer) runs at every
    log before the scalars are written and may return more scalars to write. hint:
    a note for the divergence message (e.g. the learning rate).
    """
    import orbax.checkpoint as ocp

    # A rerun after an interruption (what the checkpoints are for) then loads the step graph from
    # disk instead of compiling it again; a cache directory the caller chose is left alone.
    compile_cache.ensure_enabled()
    n_dev = mesh.devices.size
    if batches.batch_size % n_dev:
        raise ConfigError(f"train.batch_size {batches.batch_size} is not divisible by {n_dev} devices")
    data_sharding = parallel.batch_sharded(mesh)
    ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=int(keep_checkpoints), create=True))
    writer = None
    note = f" ({hint})" if hint else ""

    def save(state, step):
        # The loss is taken before the update, so a finite loss can come with non-finite parameters.
        if not all_finite(state):
            since = mngr.latest_step() or 0
            raise TrainingDiverged(f"the trained parameters became non-finite between steps {since + 1} and {step}"
                                   f"{note}; {_last_good(mngr)}")
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(batches.state())), force=True)

    try:
        latest = mngr.latest_step()
        if latest is None:
            state = parallel.place(init_state(), mesh)
        else:
            target = parallel.abstract_on(jax.eval_shape(init_state), mesh)
            restored = mngr.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            state = restored.state
            batches.restore(restored.data)
            report(f"resumed from {ckpt_dir} at step {int(state['step'])}")
        writer = metric_writer(workdir, just_logging=jax.process_index() > 0)

        step = start = int(state["step"])
        total = int(total_steps)
        acc, n_acc, history = None, 0, []
        t_start = t_last = time.perf_counter()
        with _StopSignals() as stop:
            while step < total and not stop.received:
                batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(data_sharding, a),
                                     next(batches))
                state, metrics = step_fn(state, batch)
                step += 1
                acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
                n_acc += 1
                if step % log_every == 0 or step == total:
                    m = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}
                    if not all(np.isfinite(v) for v in m.values()):
                        raise TrainingDiverged(f"loss became non-finite between steps {step - n_acc + 1} and {step}"
                                               f"{note}; {_last_good(mngr)}")
                    now = time.perf_counter()
                    m["steps_per_sec"] = n_acc / (now - t_last)
                    if on_log is not None:
                        m.update(on_log(step, state, m, writer) or {})
                    writer.write_scalars(step, m)
                    history.append(dict(m, step=step))
                    rate = (step - start) / (now - t_start)
                    log.info("step %d/%d, %.2f steps/s, %s left", step, total, rate,
                             _format_eta((total - step) / rate))
                    acc, n_acc, t_last = None, 0, time.perf_counter()
                if step % checkpoint_every == 0 or step == total:
                    save(state, step)
            # The previous handlers come back before the save below: a second Ctrl-C or
            # SIGTERM then acts as it would have without this loop (as a forced stop).
            stop.restore()
            if stop.received:
                _stop_here(state, step, acc, mngr, save, report)
        mngr.wait_until_finished()
        return state, history
    finally:
        mngr.close()
        if writer is not None:
            writer.close()


def _stop_here(state, step, acc, mngr, save, report):
    """An interruption keeps what was done: a checkpoint where the run stopped, if it is sane."""
    if mngr.latest_step() != step:
        sane = (acc is None or all(np.isfinite(float(v)) for v in jax.device_get(acc).values())) and all_finite(state)
        if not sane:
            report(f"interrupted at step {step}; the state is not finite, so nothing was saved and "
                   f"{_last_good(mngr)}")
            raise KeyboardInterrupt
        save(state, step)
        mngr.wait_until_finished()
    report(f"interrupted at step {step}; checkpoint saved, rerun the same command to resume")
    raise KeyboardInterrupt
