"""The training loop both jobs share: resume, SIGTERM / Ctrl-C, divergence, metric writers.

A toy job (a 3-vector pulled towards the batch means with fold_in(seed, step)
noise) exercises the loop itself in milliseconds; one test interrupts a real
`scripts/train_dit.py` run with SIGTERM and resumes it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from l2c_jax import parallel
from l2c_jax.training.data import ArraySource, Batches
from l2c_jax.training.loop import JsonLinesWriter, metric_writer, train_loop
from l2c_jax.training.trainer import TrainingDiverged


def toy_batches():
    rng = np.random.default_rng(0)
    return Batches(ArraySource(rng.integers(0, 255, (12, 2, 2, 1), dtype=np.uint8), np.arange(12) % 3),
                   batch_size=4, seed=0, flip=True)


@jax.jit
def _toy_step(state, batch):
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(0), state["step"]), (3,))
    target = jnp.mean(batch["images"]) + 0.1 * noise
    w = state["w"] + 0.5 * (target - state["w"])
    return dict(w=w, step=state["step"] + 1), dict(loss=jnp.sum((w - target) ** 2))


def toy_init():
    return dict(w=jnp.zeros(3), step=jnp.int32(0))


def run_toy(workdir, steps, step_fn=_toy_step, reports=None, **kw):
    opts = dict(log_every=2, checkpoint_every=3, keep_checkpoints=10)
    opts.update(kw)
    return train_loop(toy_init, step_fn, toy_batches(), parallel.make_mesh(), workdir=str(workdir),
                      total_steps=steps, report=(reports.append if reports is not None else lambda *_: None), **opts)


def steps_saved(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    ref, hist = run_toy(tmp_path / "ref", 8)
    assert [h["step"] for h in hist] == [2, 4, 6, 8] and all("steps_per_sec" in h for h in hist)
    assert steps_saved(tmp_path / "ref") == [3, 6, 8]
    run_toy(tmp_path / "two", 5)
    reports = []
    state, hist = run_toy(tmp_path / "two", 8, reports=reports)
    assert any(r.startswith("resumed from") and r.endswith("at step 5") for r in reports)
    assert [h["step"] for h in hist] == [6, 8]
    # the same batches (data position restored) and the same fold_in draws
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(ref["w"]))
    assert int(state["step"]) == 8


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_a_step_boundary_saves_and_resumes(tmp_path, sig):
    ref, _ = run_toy(tmp_path / "ref", 9)

    def step_then_signal(state, batch):
        out = _toy_step(state, batch)
        if int(out[0]["step"]) == 4:
            os.kill(os.getpid(), sig)  # lands while the loop runs, as a scheduler's SIGTERM or a Ctrl-C would
        return out

    before = signal.getsignal(sig)
    reports = []
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path / "w", 9, step_fn=step_then_signal, reports=reports)
    assert signal.getsignal(sig) is before  # the caller's handler is back
    assert reports[-1] == "interrupted at step 4; checkpoint saved, rerun the same command to resume"
    assert steps_saved(tmp_path / "w") == [3, 4]
    state, _ = run_toy(tmp_path / "w", 9)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(ref["w"]))


def test_a_signal_on_a_non_finite_state_saves_nothing(tmp_path):
    def step_nan_then_signal(state, batch):
        state, m = _toy_step(state, batch)
        if int(state["step"]) == 4:
            state = dict(state, w=state["w"] * jnp.nan)
            os.kill(os.getpid(), signal.SIGTERM)
        return state, m

    reports = []
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path / "w", 9, step_fn=step_nan_then_signal, reports=reports, log_every=100)
    assert "not finite" in reports[-1] and "last good checkpoint (step 3)" in reports[-1]
    assert steps_saved(tmp_path / "w") == [3]


def test_a_non_finite_loss_raises_naming_the_steps_and_the_last_good_checkpoint(tmp_path):
    def step_nan_after_4(state, batch):
        state, m = _toy_step(state, batch)
        return state, dict(loss=jnp.where(state["step"] > 4, jnp.nan, m["loss"]))

    with pytest.raises(TrainingDiverged, match=r"between steps 5 and 6 \(lr 1\); the last good checkpoint "
                                               r"\(step 3\) is kept"):
        run_toy(tmp_path / "w", 9, step_fn=step_nan_after_4, hint="lr 1")
    assert steps_saved(tmp_path / "w") == [3]


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    def step_nan_state(state, batch):  # finite loss, NaN parameters: caught at the checkpoint
        state, m = _toy_step(state, batch)
        return dict(state, w=jnp.where(state["step"] > 4, jnp.nan, state["w"])), m

    with pytest.raises(TrainingDiverged, match=r"non-finite between steps 4 and 6; "
                                               r"the last good checkpoint \(step 3\)"):
        run_toy(tmp_path / "w", 9, step_fn=step_nan_state, log_every=100)
    assert steps_saved(tmp_path / "w") == [3]


def test_the_writer_falls_back_to_json_lines_without_tensorflow(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    w = metric_writer(str(tmp_path))
    assert isinstance(w, JsonLinesWriter)
    w.write_scalars(3, {"loss": np.float32(0.5)})
    w.write_images(3, {"router": np.zeros((1, 2, 2, 3))})
    w.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 3, "loss": 0.5}]


def test_training_without_tensorflow_writes_metrics_jsonl(tmp_path):
    # TensorFlow made unimportable before anything loads: clu's writers (which import it) must stay unused.
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "sys.path.insert(0, 'tests')\n"
            "import test_training_loop as t\n"
            f"t.run_toy({str(tmp_path)!r}, 4)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('tensorflow.', 'clu.metric_writers')))\n"
            "print('LOADED', bad)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "LOADED []"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert not any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def dit_cmd(workdir, steps):
    return [sys.executable, "scripts/train_dit.py", "--config", "configs/digits_dit.py", "--workdir", str(workdir),
            "--config.model.arch.depth=1", "--config.model.arch.hidden_size=16", f"--config.train.steps={steps}",
            "--config.train.batch_size=16", "--config.train.log_every=10", "--config.train.checkpoint_every=10"]


@pytest.mark.slow
def test_sigterm_during_train_dit_saves_and_the_rerun_continues_exactly(tmp_path):
    from l2c_jax import load_model

    steps, work = 60, tmp_path / "killed"
    # A fresh compilation cache: the rerun loads the step graph the first runs compiled.
    env = dict(os.environ, L2C_JAX_CACHE_DIR=str(tmp_path / "xla"))
    ref = subprocess.Popen(dit_cmd(tmp_path / "ref", steps), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    proc = subprocess.Popen(dit_cmd(work, steps), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (work / "checkpoints" / "10").exists():
            time.sleep(0.05)
        assert (work / "checkpoints" / "10").exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        ref_out, ref_err = ref.communicate(timeout=300)
    finally:
        for p in (proc, ref):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert ref.returncode == 0, ref_err[-2000:]
    assert proc.returncode == 130, err[-2000:]  # run_main's exit status for KeyboardInterrupt
    line = [ln for ln in out.splitlines() if ln.startswith("interrupted at step")]
    assert line and line[0].endswith("; checkpoint saved, rerun the same command to resume"), out
    stopped = int(line[0].split()[3].rstrip(";"))
    assert 10 <= stopped < steps and max(steps_saved(work)) == stopped
    assert not (work / "model").exists()

    r = subprocess.run(dit_cmd(work, steps), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {stopped}" in r.stdout and "resumed from" in r.stdout
    a, b = load_model(str(work / "model")), load_model(str(tmp_path / "ref" / "model"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def test_the_router_step_compiles_once(tmp_path, caplog):
    """The initial state is committed to the mesh like every later one, so step 2 reuses step 1's program."""
    import logging

    from l2c_jax.cli import parse_config_flags
    from l2c_jax.training.trainer import train_router

    config, _ = parse_config_flags(["--config", "configs/router_dit.py:smoke_imagefree", "--config.train.steps=3",
                                    "--config.train.log_every=1", "--config.data.num_trajectories=8"])
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            train_router(config, str(tmp_path), report=lambda *_: None)
    finally:
        jax.config.update("jax_log_compiles", previous)
    steps = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
    assert len(steps) == 1, [r.getMessage()[:200] for r in steps]
