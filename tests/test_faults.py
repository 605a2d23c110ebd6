"""Fault injection: what a careless or hostile user does to outputs, models, configs and workdirs.

Four kinds (issue "nothing lost, nothing silently wrong"), each case ending in a
one-line error with nothing changed on disk, or in a correct result:
- overwrites: converters, router export and sampling never replace or delete
  what the job did not create unless told to (--overwrite);
- silently wrong results: NaN/inf weights, flipped bytes, an edited config,
  orphaned shards, a resumed run with another config;
- unclear errors: a damaged orbax directory, impossible architectures;
- concurrency: a workdir held by a live job, a stale lock taken over.
The in-process cases call the commands' `main` (what the console entry point
runs, without a new interpreter); the one-line-on-stderr cases run the script.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, fixture_path
from l2c_jax.errors import CheckpointError, ConfigError, L2CError

DIT_PT = fixture_path("dit", "dit_tiny.pt")


def tree_digest(path) -> str:
    """A digest of every file name and byte below `path` (or of the file): 'nothing changed on disk'."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        h.update(open(path, "rb").read())
        return h.hexdigest()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def refused(fn, *needles, kind=L2CError):
    """Runs fn, expects a one-line `kind` error holding every needle; returns the message."""
    with pytest.raises(kind) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def convert(*args):
    from l2c_jax.commands import convert_dit
    return convert_dit.main(list(args))


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faults") / "dit")
    convert("--checkpoint", DIT_PT, "--num-heads", "4", "--out", d)
    return d


def copy_model(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------- overwrites

def test_converter_refuses_an_existing_out_and_replaces_it_only_when_told(dit_dir, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    refused(lambda: convert("--checkpoint", DIT_PT, "--num-heads", "4", "--out", str(f)), "exists there already",
            "--overwrite")
    assert f.read_text() == "mine"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    refused(lambda: convert("--checkpoint", DIT_PT, "--num-heads", "4", "--out", str(folder)), "exists there already")
    assert os.listdir(folder) == ["keep.txt"]
    model = copy_model(dit_dir, tmp_path / "m")
    before = tree_digest(model)
    refused(lambda: convert("--checkpoint", DIT_PT, "--num-heads", "4", "--out", model), "exists there already")
    assert tree_digest(model) == before
    convert("--checkpoint", DIT_PT, "--num-heads", "4", "--out", model, "--overwrite")
    from l2c_jax.model import load_model
    assert load_model(model).config.depth == 4
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".partial", ".replaced"))]


def test_diffusers_folder_converted_in_place_is_refused_even_with_overwrite(dit_dir, tmp_path):
    folder = str(tmp_path / "transformer")
    convert("--export-diffusers", dit_dir, "--out", folder)
    before = tree_digest(folder)
    refused(lambda: convert("--checkpoint", folder, "--out", folder, "--overwrite"), "is (or holds) the input")
    refused(lambda: convert("--checkpoint", os.path.join(folder, "config.json"), "--out", folder, "--overwrite"),
            "is (or holds) the input")
    assert tree_digest(folder) == before
    convert("--checkpoint", folder, "--out", str(tmp_path / "converted"))  # still convertible


def test_export_diffusers_onto_a_model_directory_is_refused(dit_dir, tmp_path):
    model = copy_model(dit_dir, tmp_path / "m")
    before = tree_digest(model)
    refused(lambda: convert("--export-diffusers", model, "--out", model, "--overwrite"), "is (or holds) the input")
    other = copy_model(dit_dir, tmp_path / "other")
    refused(lambda: convert("--export-diffusers", model, "--out", other), "exists there already")
    assert tree_digest(model) == before and tree_digest(other) == before


def test_router_out_and_export_refuse_existing_files(tmp_path):
    from l2c_jax.commands import convert_router
    src = fixture_path("dit", "dit_tiny_router_ddim10.pt")
    out = tmp_path / "r.safetensors"
    convert_router.main(["--checkpoint", src, "--out", str(out)])
    before = tree_digest(str(out))
    refused(lambda: convert_router.main(["--checkpoint", src, "--out", str(out), "--threshold", "0.2"]),
            "exists there already")
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"precious")
    refused(lambda: convert_router.main(["--export-torch", str(out), "--out", str(mine)]), "exists there already")
    assert tree_digest(str(out)) == before and mine.read_bytes() == b"precious"
    convert_router.main(["--checkpoint", src, "--out", str(out), "--threshold", "0.2", "--overwrite"])
    from l2c_jax.router import load_router
    assert load_router(str(out)).threshold == pytest.approx(0.2)


def _sample_config(workdir, **kw):
    from l2c_jax.configs.dit_sample import get_config
    c = get_config("digits_ddim20")
    c.num_samples, c.batch_size, c.npz, c.workdir = 8, 8, "samples.npz", str(workdir)
    for k, v in kw.items():
        c[k] = v
    return c


def _sample(config):
    from l2c_jax.pipelines import run_sampling
    return run_sampling(config, report=lambda *_: None)


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    w = tmp_path_factory.mktemp("sampled") / "w"
    _sample(_sample_config(w))
    return w


@pytest.mark.slow
def test_finished_workdir_rerun_with_another_seed_is_refused(finished_workdir, tmp_path):
    import shutil
    w = tmp_path / "w"
    shutil.copytree(finished_workdir, w)
    before = tree_digest(str(w / "samples.npz"))
    refused(lambda: _sample(_sample_config(w, seed=3)), "differs in seed", "--config.overwrite=True")
    assert tree_digest(str(w / "samples.npz")) == before
    _sample(_sample_config(w))  # the same job again: allowed, the same images
    assert tree_digest(str(w / "samples.npz")) == before
    _sample(_sample_config(w, seed=3, overwrite=True))
    assert tree_digest(str(w / "samples.npz")) != before


def test_outputs_no_job_recorded_are_refused(tmp_path):
    (tmp_path / "samples.npz").write_bytes(b"the user's own")
    refused(lambda: _sample(_sample_config(tmp_path)), "no sampling job recorded them")
    assert (tmp_path / "samples.npz").read_bytes() == b"the user's own"


def test_users_shards_folder_is_neither_adopted_nor_deleted(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "notes.txt").write_text("mine")
    refused(lambda: _sample(_sample_config(tmp_path)), "files this job did not write")
    assert (shards / "notes.txt").read_text() == "mine"


def test_npz_inside_the_shards_folder_is_refused(tmp_path):
    refused(lambda: _sample(_sample_config(tmp_path, npz="shards/out.npz")), "scratch folder")


def test_shard_removal_keeps_what_the_job_did_not_write(tmp_path):
    from l2c_jax.shards import ShardStore
    store = ShardStore(str(tmp_path / "s"), {"seed": 0}, 4)
    store.prepare()
    store.write([0, 1, 2, 3], np.zeros((4, 2, 2, 3), np.uint8))
    (tmp_path / "s" / "keep.txt").write_text("mine")
    store.remove()
    assert os.listdir(tmp_path / "s") == ["keep.txt"]


def test_router_training_refuses_a_model_directory(dit_dir, tmp_path):
    from l2c_jax.configs.router_dit import get_config
    from l2c_jax.training.trainer import train_router
    model = copy_model(dit_dir, tmp_path / "m")
    before = tree_digest(model)
    refused(lambda: train_router(get_config("smoke"), model, report=lambda *_: None), "is a model directory")
    assert tree_digest(model) == before
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "config.json").write_text("{}")
    refused(lambda: train_router(get_config("smoke"), str(tmp_path / "job"), report=lambda *_: None),
            "no training job wrote")


def test_a_sampling_workdir_is_not_a_training_workdir(finished_workdir, tmp_path):
    import shutil

    from l2c_jax.configs.router_dit import get_config
    from l2c_jax.training.trainer import train_router
    w = tmp_path / "w"
    shutil.copytree(finished_workdir, w)
    refused(lambda: train_router(get_config("smoke"), str(w), report=lambda *_: None), "belongs to a sample job")


# ---------------------------------------------------------------------------------------------- silently wrong

def _torch_checkpoint_with(tmp_path, key_fn):
    import torch
    sd = torch.load(DIT_PT, map_location="cpu", weights_only=True)
    key_fn(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    return str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_not_converted(tmp_path, value):
    def poison(sd):
        sd["blocks.1.mlp.fc1.weight"][0, 0] = value
    bad = _torch_checkpoint_with(tmp_path, poison)
    refused(lambda: convert("--checkpoint", bad, "--num-heads", "4", "--out", str(tmp_path / "o")),
            "NaN or inf", "blocks.1.mlp.fc1.weight")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_model_directory_with_non_finite_weights_is_refused_on_load(tmp_path):
    from l2c_jax.model import Model, load_model
    from l2c_jax.models.dit import DiTConfig
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    m = Model.random("dit", cfg)
    m.params = dict(m.params, final_layer=dict(m.params["final_layer"]))
    m.params["final_layer"]["linear"] = dict(m.params["final_layer"]["linear"],
                                             bias=m.params["final_layer"]["linear"]["bias"] * np.nan)
    m.save(str(tmp_path / "m"))
    refused(lambda: load_model(str(tmp_path / "m")), "NaN or inf", "final_layer", kind=CheckpointError)


def _largest_param_file(model):
    files = [os.path.join(r, n) for r, _, fs in os.walk(os.path.join(model, "params")) for n in fs]
    return max(files, key=os.path.getsize)


def test_flipped_bytes_are_found_by_the_checksum(dit_dir, tmp_path):
    from l2c_jax.model import load_model
    model = copy_model(dit_dir, tmp_path / "m")
    path = _largest_param_file(model)
    data = bytearray(open(path, "rb").read())
    for i in (len(data) // 3, len(data) // 2):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))
    refused(lambda: load_model(model), "damaged", os.path.basename(path), kind=CheckpointError)


def test_edited_config_is_refused(dit_dir, tmp_path):
    from l2c_jax.model import load_model
    model = copy_model(dit_dir, tmp_path / "m")
    meta = json.load(open(os.path.join(model, "config.json")))
    meta["config"]["num_heads"] = 2  # still divides the width: the weights load, the outputs are wrong
    json.dump(meta, open(os.path.join(model, "config.json"), "w"))
    refused(lambda: load_model(model), "edited after conversion", kind=CheckpointError)


def test_model_directories_of_earlier_releases_load_without_checksums(dit_dir, tmp_path):
    from l2c_jax.model import load_model
    model = copy_model(dit_dir, tmp_path / "m")
    meta = json.load(open(os.path.join(model, "config.json")))
    del meta["checksums"], meta["config_checksum"]
    json.dump(meta, open(os.path.join(model, "config.json"), "w"))
    assert load_model(model).config.depth == 4


def test_orphaned_shards_are_refused(tmp_path):
    from l2c_jax.shards import ShardStore
    a = ShardStore(str(tmp_path / "shards"), {"seed": 0}, 8)
    a.prepare()
    a.write([0, 1], np.zeros((2, 2, 2, 1), np.uint8))
    os.remove(tmp_path / "shards" / "job.json")  # two jobs raced; the record went with the other
    refused(lambda: _sample(_sample_config(tmp_path)), "shards of an unknown job")
    assert sorted(os.listdir(tmp_path / "shards")) == ["shard-000000000.npz"]


@pytest.mark.slow
def test_training_resume_with_another_config_is_refused_naming_keys(tmp_path):
    from l2c_jax.configs.router_digits import get_config
    from l2c_jax.training.trainer import train_router

    def config(steps):
        c = get_config("20")
        c.train.steps, c.train.batch_size, c.train.checkpoint_every, c.train.log_every = steps, 8, 2, 2
        return c

    c = config(2)
    w = str(tmp_path / "w")
    train_router(c, w, report=lambda *_: None)
    before = tree_digest(os.path.join(w, "checkpoints"))
    for key, value in (("seed", 5), ("train.l1", 0.5), ("sampler.steps", 50)):
        d = config(4)
        section, _, leaf = key.rpartition(".")
        (d[section] if section else d)[leaf] = value
        refused(lambda: train_router(d, w, report=lambda *_: None), key, "another config")
    assert tree_digest(os.path.join(w, "checkpoints")) == before
    from l2c_jax.training.loop import prepare_workdir
    prepare_workdir(config(4), w, "train_router")  # more steps: a resume, allowed (test_train_router runs one)
    assert json.load(open(os.path.join(w, "config.json")))["train"]["steps"] == 4


def test_harness_and_latent_workdirs_are_held_and_kept_to_their_kind(tmp_path):
    """The comparison, the methods harness and latent extraction refuse a model directory, a workdir of
    another kind and one a live job holds, before loading anything."""
    import socket

    import ml_collections

    from l2c_jax.cli import parse_config_flags
    from l2c_jax.compare_methods import run_compare, run_methods
    from l2c_jax.training.extract import extract_latents
    from l2c_jax.workdirs import LOCK, claim

    model_dir = tmp_path / "model"
    (model_dir / "params").mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"family": "dit", "config": {}}))
    sampling = tmp_path / "sampling"
    claim(str(sampling), "sample")
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK).write_text(f"{os.getpid()} {socket.gethostname()}\n")

    compare, _ = parse_config_flags(["--config", "configs/digits.py"])
    methods, _ = parse_config_flags(["--config", "configs/methods_digits.py:quick"])
    latents = ml_collections.ConfigDict(dict(vae=dict(checkpoint="unused"), data=dict(latents="")))
    quiet = dict(report=lambda *_: None)
    for run in (lambda w: run_compare(compare, str(w), **quiet), lambda w: run_methods(methods, str(w), **quiet),
                lambda w: extract_latents(latents, str(w), **quiet)):
        refused(lambda: run(model_dir), "is a model directory")
        refused(lambda: run(sampling), "belongs to a sample job")
        refused(lambda: run(held), "is in use by process")
    assert sorted(os.listdir(model_dir)) == ["config.json", "params"] and sorted(os.listdir(held)) == [LOCK]


# ---------------------------------------------------------------------------------------------- unclear errors

def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_line(r, *needles):
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_orbax_directory_is_one_line(dit_dir, tmp_path, damage):
    model = copy_model(dit_dir, tmp_path / "m")
    meta = json.load(open(os.path.join(model, "config.json")))
    del meta["checksums"]  # what orbax itself says, not the checksum
    json.dump(meta, open(os.path.join(model, "config.json"), "w"))
    path = _largest_param_file(model)
    if damage == "delete":
        os.remove(path)
    else:
        open(path, "r+b").truncate(16)
    code = f"from l2c_jax.cli import run_main; from l2c_jax.model import load_model; run_main(lambda a: load_model({model!r}))"
    r = _run("-c", code)
    _one_line(r, model)
    assert len(r.stderr.strip()) < 600, r.stderr


@pytest.mark.parametrize("edit,needle", [({"depth": 2.5}, "depth must be a whole number"),
                                         ({"num_heads": 3}, "not divisible by num_heads"),
                                         ({"num_heads": 0}, "num_heads must be a whole number"),
                                         ({"input_size": 7}, "not divisible by patch_size")])
def test_impossible_architectures_are_one_line(dit_dir, tmp_path, edit, needle):
    from l2c_jax.checkpoint import config_checksum
    from l2c_jax.model import load_model
    model = copy_model(dit_dir, tmp_path / "m")
    meta = json.load(open(os.path.join(model, "config.json")))
    meta["config"].update(edit)
    meta["config_checksum"] = config_checksum(meta["config"])  # a directory written that way, not edited
    json.dump(meta, open(os.path.join(model, "config.json"), "w"))
    refused(lambda: load_model(model), needle, "config.json", kind=CheckpointError)
    from l2c_jax.models.dit import DiTConfig
    refused(lambda: DiTConfig(**meta["config"]), needle, kind=ConfigError)


# ---------------------------------------------------------------------------------------------- concurrency

def test_a_workdir_held_by_a_live_job_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import socket

    from l2c_jax.workdirs import LOCK
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / LOCK).write_text(f"{holder.pid} {socket.gethostname()}\n")
        refused(lambda: _sample(_sample_config(tmp_path)), f"in use by process {holder.pid}")
        assert not (tmp_path / "shards").exists() and not (tmp_path / "samples.npz").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    _sample(_sample_config(tmp_path))  # the holder is gone: its lock is taken over
    assert (tmp_path / "samples.npz").exists() and not (tmp_path / LOCK).exists()


@pytest.mark.slow
def test_two_sampling_jobs_on_one_workdir(tmp_path):
    """A real second process while the first samples: refused at once, the first finishes whole."""
    import time

    from l2c_jax.workdirs import LOCK
    cmd = ["scripts/sample.py", "--config", "configs/dit_sample.py:digits_ddim20", "--workdir", str(tmp_path),
           "--config.num_samples=256", "--config.batch_size=8"]
    first = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / LOCK).exists() and first.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / LOCK).exists(), "the first job never took the lock"
        # the second job: this process, so that it asks while the first still samples
        refused(lambda: _sample(_sample_config(tmp_path, num_samples=256)), f"in use by process {first.pid}")
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    with np.load(tmp_path / "samples.npz") as z:
        assert z["arr_0"].shape[0] == 256
    assert not (tmp_path / "shards").exists()


def test_a_first_batch_of_nan_writes_nothing(tmp_path):
    c = _sample_config(tmp_path)
    c.sampler.cfg_scale = 1e38  # finite, accepted; overflows the guided output to inf and NaN
    refused(lambda: _sample(c), "NaN or inf", "nothing was written")
    assert not (tmp_path / "samples.npz").exists() and os.listdir(tmp_path / "shards") == ["job.json"]
