"""Routers: the released files' numbers, the cache masks of the original samplers, formats and the CLI."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, fixture_path
from l2c_jax import CheckpointError, ConfigError
from l2c_jax.router import Router, export_torch, load_router, save_router

RELEASED = ("DDIM20_router.pt", "DDIM50_router.pt", "dpm20_router.pth", "dpm50_router.pth")


@pytest.fixture(scope="module")
def expected():
    with open(fixture_path("routers", "routers_expected.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# The released routers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", RELEASED)
def test_released_router_summary(name, expected):
    e = expected[name]
    r = load_router(fixture_path("routers", name))
    assert r.kind == {"dit": "dit-ddim", "uvit": "uvit-dpm2"}[e["model"]]
    assert r.steps == e["router_rows"] == e["nfe"]
    assert r.num_units == e["width"]
    assert r.prob.dtype == np.float32 and r.prob.shape == (e["router_rows"], e["width"])
    assert r.cache_rows() == e["cache_rows"]
    computed, total = r.counts(e["threshold"])
    assert computed == e["computed_in_cache_steps"]
    assert total == e["sublayers_in_cache_steps"]
    assert round(r.removed_ratio(e["threshold"]), 4) == e["removed_ratio_in_cache_steps"]
    assert r.summary(e["threshold"]) == (
        f"cache steps compute {computed}/{total} sub-layers ({100 * e['removed_ratio_in_cache_steps']:.2f}% removed)")
    # Masks agree with the cache rows: full steps all True, cache steps thresholded.
    m = r.masks(e["threshold"])
    assert m.shape == (r.sampler_steps, e["width"])
    full = sorted(set(range(r.sampler_steps)) - set(r.cache_steps()))
    assert m[full].all()
    assert int(m[r.cache_steps()].sum()) == computed


def test_summary_text_from_api():
    r = load_router(fixture_path("routers", "DDIM20_router.pt"))
    assert r.summary(0.1) == "cache steps compute 312/560 sub-layers (44.29% removed)"
    r = load_router(fixture_path("routers", "dpm50_router.pth"))
    assert r.summary(0.9) == "cache steps compute 88/1392 sub-layers (93.68% removed)"


def test_threshold_matches_torch_sigmoid():
    """The original thresholds torch.sigmoid(prob) > thres in float32."""
    for name, thr in (("DDIM50_router.pt", 0.1), ("dpm50_router.pth", 0.9)):
        r = load_router(fixture_path("routers", name))
        want = (torch.sigmoid(torch.from_numpy(r.prob)) > thr).numpy()
        np.testing.assert_array_equal(r.beta() > np.float32(thr), want)


# ---------------------------------------------------------------------------
# Masks in sampling order against the original samplers' runs
# ---------------------------------------------------------------------------

def test_dit_masks_match_fixture():
    io = np.load(fixture_path("dit", "dit_tiny_io.npz"))
    r = load_router(fixture_path("dit", "dit_tiny_router_ddim10.pt"))
    assert r.kind == "dit-ddim" and r.steps == 10 and r.num_units == 8
    m = r.masks(float(io["l2c_threshold"]), steps=int(io["ddim_steps"]))
    np.testing.assert_array_equal(m, io["l2c_masks"])
    # Cache step s uses row steps-1-s, the respaced index of that step.
    beta = r.beta()
    for s in range(1, 10, 2):
        np.testing.assert_array_equal(m[s], beta[9 - s] > 0.5)
    with pytest.raises(ConfigError):
        r.masks(0.5, steps=20)


def test_uvit_masks_match_fixture():
    io = np.load(fixture_path("uvit", "uvit_tiny_io.npz"))
    r = load_router(fixture_path("uvit", "uvit_tiny_router_dpm10.pth"))
    assert r.kind == "uvit-dpm2" and r.steps == int(io["dpm_nfe"]) == 10
    m = r.masks(float(io["l2c_threshold"]))
    assert m.shape == (5, 10) == io["l2c_masks"].shape
    np.testing.assert_array_equal(m, io["l2c_masks"])
    # Step k (k >= 1) uses router row k; rows NFE//2.. are never used.
    beta = r.beta()
    for k in range(1, 5):
        np.testing.assert_array_equal(m[k], beta[k] > 0.5)
    assert r.cache_rows() == [1, 2, 3, 4]


def test_odd_dit_steps_refused():
    r = Router(prob=np.zeros((5, 4), np.float32), kind="dit-ddim")
    with pytest.raises(ConfigError, match="even"):
        r.masks(0.5)
    with pytest.raises(ConfigError):
        Router(prob=np.zeros((4, 3), np.float32), kind="dit-ddim")
    with pytest.raises(ConfigError):
        Router(prob=np.zeros((4, 4), np.float32), kind="sd-ddim")
    with pytest.raises(ConfigError, match="threshold"):
        Router(prob=np.zeros((4, 4), np.float32), kind="dit-ddim").masks()


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------

def test_project_format_round_trip(tmp_path):
    src = load_router(fixture_path("routers", "DDIM20_router.pt"), threshold=0.1)
    path = save_router(src, tmp_path / "r.safetensors")
    back = load_router(path)
    assert back.kind == "dit-ddim" and back.threshold == 0.1
    np.testing.assert_array_equal(back.prob, src.prob)
    assert back.summary() == src.summary()
    # A directory holding router.safetensors loads too.
    d = tmp_path / "routerdir"
    save_router(load_router(fixture_path("routers", "dpm20_router.pth")), d)
    assert os.path.exists(d / "router.safetensors")
    back = load_router(d)
    assert back.kind == "uvit-dpm2" and back.threshold is None
    # A kind contradicting the file's metadata is an error; the same kind is fine.
    with pytest.raises(ConfigError, match="uvit-dpm2"):
        load_router(d, kind="dit-ddim")
    assert load_router(d, kind="uvit-dpm2").steps == 20


def test_project_format_metadata_checked(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "bad.safetensors"
    save_file({"prob": np.zeros((4, 6), np.float32)}, str(p),
              metadata={"format": "l2c_jax.router", "format_version": "1", "kind": "dit-ddim",
                        "steps": "4", "num_units": "8"})
    with pytest.raises(CheckpointError, match="metadata"):
        load_router(p)
    save_file({"prob": np.zeros((4, 6), np.float32)}, str(p),
              metadata={"format": "l2c_jax.router", "format_version": "99", "kind": "dit-ddim",
                        "steps": "4", "num_units": "6"})
    with pytest.raises(CheckpointError, match="newer"):
        load_router(p)


@pytest.mark.parametrize("name", ["DDIM20_router.pt", "dpm20_router.pth"])
def test_export_torch_reloads_identically(name, tmp_path):
    src = load_router(fixture_path("routers", name))
    out = export_torch(src, tmp_path / "exported.pt")
    back = load_router(out)
    assert back.kind == src.kind
    np.testing.assert_array_equal(back.prob, src.prob)

    # The original loads it into per-step Router modules with load_state_dict.
    class TorchRouter(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.prob = torch.nn.Parameter(torch.zeros(n))

    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    state = ckpt["routers"] if src.kind == "dit-ddim" else ckpt
    assert set(ckpt) == ({"routers"} if src.kind == "dit-ddim" else {f"{i}.prob" for i in range(src.steps)})
    routers = torch.nn.ModuleList([TorchRouter(src.num_units) for _ in range(src.steps)])
    routers.load_state_dict(state)  # strict
    np.testing.assert_array_equal(np.stack([r.prob.detach().numpy() for r in routers]), src.prob)


def _save_rows(path, rows, dit=False):
    sd = {k: torch.as_tensor(v) for k, v in rows.items()}
    torch.save({"routers": sd, "opt": {}} if dit else sd, path)
    return path


def test_malformed_router_files_refused(tmp_path):
    z = np.zeros(8, np.float32)
    with pytest.raises(CheckpointError, match="not contiguous"):
        load_router(_save_rows(tmp_path / "gap.pth", {"0.prob": z, "2.prob": z}))
    with pytest.raises(CheckpointError, match="different lengths"):
        load_router(_save_rows(tmp_path / "ragged.pt", {"0.prob": z, "1.prob": np.zeros(6, np.float32)}, dit=True))
    with pytest.raises(CheckpointError, match="even"):
        load_router(_save_rows(tmp_path / "odd.pth", {"0.prob": np.zeros(7, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_router(_save_rows(tmp_path / "model.pth", {"blocks.0.weight": z}))
    with pytest.raises(CheckpointError, match="no such file"):
        load_router(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError):
        load_router(tmp_path)  # a directory without router.safetensors


def test_truncated_file_refused(tmp_path):
    data = open(fixture_path("routers", "DDIM20_router.pt"), "rb").read()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_router(bad)
    src = tmp_path / "ok.safetensors"
    save_router(load_router(fixture_path("routers", "DDIM20_router.pt")), src)
    data = src.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:-100])
    with pytest.raises(CheckpointError):
        load_router(bad)


# ---------------------------------------------------------------------------
# CLI. Every subprocess pays for importing torch and jax (seconds each), so
# the subprocess runs are started together once, and the remaining cases go
# through the same entry point (`run_main(main)`) in-process.
# ---------------------------------------------------------------------------

def _cli_module():
    from l2c_jax.commands import convert_router as mod
    return mod


def run_inprocess(capsys, *args):
    from l2c_jax.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(_cli_module().main, list(args))
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    project = save_router(load_router(fixture_path("routers", "DDIM20_router.pt"), threshold=0.1),
                          tmp / "ddim20_in.safetensors")
    evil = tmp / "evil_router.pth"
    torch.save({"0.prob": torch.zeros(4), "1.prob": _Payload(str(tmp / "pwned"))}, evil)
    cases = {
        "convert": ("--checkpoint", fixture_path("routers", "DDIM20_router.pt"), "--kind", "dit-ddim",
                    "--out", str(tmp / "ddim20.safetensors"), "--threshold", "0.1", "--summary"),
        "export": ("--export-torch", project, "--out", str(tmp / "DDIM20_again.pt")),
        "evil": ("--checkpoint", str(evil), "--out", str(tmp / "evil_out.safetensors")),
        "contradiction": ("--checkpoint", project, "--kind", "uvit-dpm2", "--summary"),
    }
    procs = {k: subprocess.Popen([sys.executable, "convert/router.py", *a], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, a in cases.items()}
    results = {}
    for k, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[k] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    results["tmp"] = tmp
    return results


@pytest.mark.slow
def test_cli_convert_and_export(cli_runs):
    tmp = cli_runs["tmp"]
    res = cli_runs["convert"]
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "cache steps compute 312/560 sub-layers (44.29% removed)"
    converted = load_router(tmp / "ddim20.safetensors")
    assert converted.threshold == 0.1 and converted.kind == "dit-ddim"
    original = load_router(fixture_path("routers", "DDIM20_router.pt"))
    np.testing.assert_array_equal(converted.prob, original.prob)

    res = cli_runs["export"]
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(load_router(tmp / "DDIM20_again.pt").prob, original.prob)


def test_cli_refuses_pickled_code(cli_runs, tmp_path):
    tmp = cli_runs["tmp"]
    res = cli_runs["evil"]
    assert res.returncode != 0
    assert not (tmp / "pwned").exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused" in lines[0]
    assert not (tmp / "evil_out.safetensors").exists()

    # A bare (non-zip) pickle gets the same treatment.
    target = tmp_path / "pwned"
    raw = tmp_path / "evil_raw.pt"
    with open(raw, "wb") as f:
        pickle.dump({"routers": {"0.prob": _Payload(str(target))}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_router(raw)
    assert not target.exists()


def test_cli_kind_contradiction_subprocess(cli_runs):
    res = cli_runs["contradiction"]
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "dit-ddim" in lines[0] and "Traceback" not in res.stderr


def test_cli_summaries_inprocess(capsys, tmp_path):
    code, out, err = run_inprocess(capsys, "--checkpoint", fixture_path("routers", "dpm50_router.pth"),
                                   "--threshold", "0.9", "--summary")
    assert code == 0, err
    assert out.strip() == "cache steps compute 88/1392 sub-layers (93.68% removed)"
    # The stored threshold serves later summaries.
    d = tmp_path / "dpm20"
    code, out, err = run_inprocess(capsys, "--checkpoint", fixture_path("routers", "dpm20_router.pth"),
                                   "--out", str(d), "--threshold", "0.9")
    assert code == 0, err
    code, out, err = run_inprocess(capsys, "--checkpoint", str(d), "--summary")
    assert code == 0, err
    assert out.strip() == "cache steps compute 189/522 sub-layers (63.79% removed)"


def test_cli_failures_are_one_line(capsys, tmp_path):
    ddim20 = fixture_path("routers", "DDIM20_router.pt")
    for args in (
        ("--checkpoint", str(tmp_path / "missing.pt"), "--summary"),
        ("--checkpoint", ddim20, "--summary"),  # no threshold known
        ("--checkpoint", ddim20),  # nothing to do
        ("--checkpoint", ddim20, "--out", str(tmp_path / "x.pt")),  # project format is not .pt
        ("--export-torch", ddim20),  # no --out
        ("--checkpoint", ddim20, "--threshold", "1.5", "--summary"),
    ):
        code, out, err = run_inprocess(capsys, *args)
        assert code != 0, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, err)
