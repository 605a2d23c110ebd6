"""The shipped configs: every file loads with every documented variant (as `--config FILE:VARIANT`),
every `model` section has the one schema, and an unknown variant is a one-line error naming the known ones."""

import ast
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT, fixture_path
from l2c_jax.cli import parse_config_flags
from l2c_jax.configs import common
from l2c_jax.errors import ConfigError
from l2c_jax.models.families import FAMILIES
from l2c_jax.resources import CONFIGS_DIR

NOT_CONFIGS = ("__init__", "common")
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f[:-3] not in NOT_CONFIGS)


def _variants(name):
    return getattr(importlib.import_module(f"l2c_jax.configs.{name}"), "VARIANTS", ("",))


def _spec(name, variant):
    return f"configs/{name}.py" + (f":{variant}" if variant else "")


CASES = [(name, v) for name in CONFIGS for v in _variants(name)]


def test_the_job_files_are_there():
    # One file per job; the variants replace the former per-setting stubs and smoke files.
    assert {"dit_sample", "uvit_sample", "router_dit", "router_uvit", "router_digits", "digits", "digits_dit",
            "bench"} <= set(CONFIGS)
    assert not [n for n in CONFIGS if "smoke" in n or n.startswith(("dit_xl2", "uvit_h2", "bench_"))]
    for name in ("dit_sample", "uvit_sample", "router_dit", "router_uvit", "bench"):
        assert "smoke" in _variants(name)


@pytest.mark.parametrize("name,variant", CASES, ids=[_spec(n, v) for n, v in CASES])
def test_every_variant_loads_with_the_model_schema(name, variant):
    config, _ = parse_config_flags(["--config", _spec(name, variant)])
    if config.get("mode") == "user_path":  # the model is the family's released one (bench/user_path.py)
        assert config.family in FAMILIES and (config.router or config.schedule)  # a router, or a method's schedule
        return
    mc = config.model
    assert set(mc.keys()) == set(common.MODEL_KEYS)
    assert mc.family in FAMILIES
    fields = {f.name for f in dataclasses.fields(FAMILIES[mc.family].config_cls)}
    assert set(mc.arch.keys()) == fields
    assert isinstance(mc.random_init, bool) and isinstance(mc.init_seed, int)
    assert mc.random_init or mc.checkpoint, "a model is either converted (checkpoint) or random"


@pytest.mark.parametrize("name", CONFIGS)
def test_an_unknown_variant_is_one_line_naming_the_known_forms(name):
    with pytest.raises(ConfigError) as e:
        parse_config_flags(["--config", f"configs/{name}.py:no_such_variant"])
    msg = str(e.value)
    assert "\n" not in msg and "unknown variant 'no_such_variant'" in msg and "known:" in msg


def test_an_unknown_variant_exits_with_one_line_on_stderr():
    r = subprocess.run([sys.executable, "scripts/sample.py", "--config", "configs/dit_sample.py:xl2_256_ddim20_l2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "unknown variant 'xl2_256_ddim20_l2'" in r.stderr and "smoke" in r.stderr


def test_variant_parsing():
    from l2c_jax.configs import bench, dit_sample, router_dit, uvit_sample

    c = dit_sample.get_config("l2_512_ddim50_l2c")
    assert (c.model.name, c.model.arch.input_size, c.sampler.steps) == ("DiT-L/2", 64, 50)
    assert c.router.checkpoint == "ckpt/router_dit_l2_512_ddim50"  # not the released XL/2 router
    assert dit_sample.get_config("xl2_256_ddim20_l2c").router.checkpoint == "ckpt/DDIM20_router.pt"
    assert dit_sample.get_config(None).to_dict() == dit_sample.get_config("xl2_256_ddim20").to_dict()
    assert uvit_sample.get_config("h2_256_nfe50_l2c").router.checkpoint == "ckpt/dpm50_router.pth"
    assert router_dit.get_config("l2_256_ddim20").train.lr == 1e-2
    assert bench.get_config("dit_b2_512_forward").model.name == "DiT-B/2"
    for bad in ("xl3_256_ddim20", "xl2_300_ddim20", "xl2_256_ddim0", "xl2_256_ddim20_l2c_x", "SMOKE"):
        with pytest.raises(ValueError, match="unknown variant"):
            dit_sample.get_config(bad)
    for bad in ("h2_256_nfe20_x", "h3_256_nfe20", "m2_256_nfe20"):
        with pytest.raises(ValueError, match="unknown variant"):
            uvit_sample.get_config(bad)
    with pytest.raises(ValueError, match="xl2_256_ddim50"):
        router_dit.get_config("xl2_256_ddim30")


def test_configs_do_not_import_each_other_through_the_checkout_package():
    for name in CONFIGS + ["common"]:
        tree = ast.parse(open(os.path.join(CONFIGS_DIR, name + ".py")).read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [m for m in mods if m == "configs" or m.startswith("configs.")], name


def test_random_init_follows_name_and_arch():
    """`name` + the arch fields that are set: a released architecture at its size, or any field overridden."""
    from l2c_jax.model import model_from_config

    def abstract(spec, *extra):
        config, _ = parse_config_flags(["--config", spec, "--config.model.random_init=True", *extra])
        return model_from_config(config.model, abstract=True)

    m = abstract("configs/dit_sample.py:xl2_512_ddim20")
    assert m.family == "dit" and (m.config.depth, m.config.hidden_size, m.config.input_size) == (28, 1152, 64)
    m = abstract("configs/router_dit.py:l2_256_ddim20", "--config.model.arch.depth=2")
    assert (m.config.depth, m.config.hidden_size, m.config.input_size) == (2, 1024, 32)
    m = abstract("configs/uvit_sample.py:h2_256_nfe20", "--config.model.arch.depth=3")
    assert m.family == "uvit" and (m.config.depth, m.config.embed_dim, m.config.img_size) == (3, 1152, 32)
    for extra, msg in [(["--config.model.name=DiT-XXL/2"], "no released dit architecture"),
                       (["--config.model.family=vit"], "family")]:
        with pytest.raises(ConfigError, match=msg):
            abstract("configs/dit_sample.py:xl2_256_ddim20", *extra)


@pytest.mark.slow
def test_smoke_models_and_the_benchmark_model():
    from l2c_jax.bench.harness import build_model, model_config
    from l2c_jax.model import model_from_config

    config, _ = parse_config_flags(["--config", "configs/dit_sample.py:smoke"])
    assert model_from_config(config.model).config.depth == 4
    config, _ = parse_config_flags(["--config", "configs/uvit_sample.py:smoke"])
    m = model_from_config(config.model)
    assert m.family == "uvit" and m.config.img_size == 16 and m.config.in_chans == 3
    config, _ = parse_config_flags(["--config", "configs/bench.py:dit_xl2_256_forward"])
    cfg = model_config(config)
    assert (cfg.depth, cfg.hidden_size, cfg.input_size) == (28, 1152, 32)
    config, _ = parse_config_flags(["--config", "configs/bench.py:smoke"])
    assert build_model(config).config.hidden_size == 64
    config, _ = parse_config_flags(["--config", "configs/bench.py:smoke", "--config.model.family=uvit",
                                    "--config.model.arch.input_size=8"])
    with pytest.raises(ConfigError):
        build_model(config, abstract=True)  # U-ViT has no input_size field, and the benchmark times DiTs


def test_a_checkpoint_of_another_family_is_refused():
    from l2c_jax.model import model_from_config

    config, _ = parse_config_flags(["--config", "configs/digits.py", "--config.model.family=uvit"])
    with pytest.raises(ConfigError, match="holds a dit model"):
        model_from_config(config.model, abstract=True)
    config, _ = parse_config_flags(["--config", "configs/digits.py"])
    m = model_from_config(config.model, abstract=True)
    assert m.family == "dit" and m.config.depth == 12


def test_train_dit_reads_a_complete_arch():
    # l2c_jax/training/train_dit.py builds its DiT with l2c_jax.model.architecture.
    from l2c_jax.model import architecture

    config, _ = parse_config_flags(["--config", "configs/digits_dit.py", "--config.model.arch.depth=2"])
    cfg = architecture(config.model)
    assert (cfg.depth, cfg.hidden_size, cfg.in_channels, cfg.input_size) == (2, 64, 1, 8)


def test_benchmark_finds_the_released_router_beside_the_checkout(tmp_path, monkeypatch):
    fixture = fixture_path("routers", "DDIM20_router.pt")  # CI has ../shared beside the checkout
    monkeypatch.chdir(tmp_path)  # no ckpt/DDIM20_router.pt here
    for path in (os.path.join(ROOT, "configs", "bench.py"), os.path.join(CONFIGS_DIR, "bench.py")):
        for variant, key in (("dit_xl2_256_ddim20", "router.checkpoint"), ("user_path_dit", "router")):
            config, _ = parse_config_flags(["--config", f"{path}:{variant}"])
            router = config.router.checkpoint if key == "router.checkpoint" else config.router
            assert os.path.samefile(router, fixture)
