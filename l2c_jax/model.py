"""`Model`: a Flax module, its config and its parameters behind the API.md call.

`model(x, t, y, cache=None, mask=None, beta=None) -> (out, cache)` jits once
per distinct static mask (a mask given as a jax array: one graph for all). `model.apply(params, ...)` is the same computation
as a pure function, for callers that jit or differentiate themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp

from l2c_jax import checkpoint, parallel
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.cache import check_mask, is_traced_mask
from l2c_jax.models.families import family_of
from l2c_jax.models.guidance import forward_with_cfg


def abstract_params(family: str, config) -> Any:
    config_cls, module_cls, example_inputs = family_of(family)
    module = module_cls(config)
    x, t, y = example_inputs(config)
    return jax.eval_shape(lambda x, t, y: module.init(jax.random.key(0), x, t, y), x, t, y)["params"]


@dataclasses.dataclass
class Model:
    family: str
    config: Any
    params: Any
    dtype: Any = jnp.float32

    def __post_init__(self):
        _, module_cls, _ = family_of(self.family)
        self.module = module_cls(self.config, dtype=self.dtype)
        self._jitted: Dict[Any, Callable] = {}
        # Samplers built for this model by `l2c_jax.sample`, keyed by what changes
        # their graphs; they live exactly as long as the model (l2c_jax.sampling).
        self.samplers: Dict[Any, Any] = {}

    def on_devices(self, mesh=None) -> "Model":
        """Places the parameters on the devices (replicated over `mesh`) once; returns self.

        Loaders return placed models already; a model built from host (NumPy)
        parameters is placed here before it samples, so no call copies weights.
        """
        if mesh is not None or not parallel.is_placed(self.params):
            self.params = parallel.place(self.params, mesh)
        return self

    @property
    def num_units(self) -> int:
        return self.config.num_units

    def apply(self, params, x, t, y=None, cache=None, mask=None, beta=None):
        """Pure forward: (out NHWC float32, new cache tuple)."""
        mask = check_mask(mask, self.num_units)
        if cache is not None and len(cache) != self.num_units:
            raise ConfigError(f"cache has {len(cache)} entries, the model has {self.num_units} sub-layers")
        return self.module.apply({"params": params}, x, t, y, cache, mask, beta)

    def apply_cfg(self, params, x, t, y, cfg_scale, cache=None, mask=None, beta=None, guidance_channels=3):
        """DiT's `forward_with_cfg` (`l2c_jax.models.guidance`): batch [cond | uncond], first half of x used."""
        return forward_with_cfg(self.apply, self.config.in_channels, params, x, t, y, cfg_scale, cache, mask, beta,
                                guidance_channels)

    def _jit(self, kind: str, mask):
        # A static mask is part of the graph (one per mask); an array mask is an argument (one graph).
        key = (kind, "traced" if is_traced_mask(mask) else mask)
        if key not in self._jitted:
            fn = self.apply if kind == "plain" else self.apply_cfg
            self._jitted[key] = (jax.jit(lambda *a, mask, **k: fn(*a, mask=mask, **k)) if is_traced_mask(mask)
                                 else jax.jit(functools.partial(fn, mask=mask)))
        return self._jitted[key]

    def _mask_kw(self, mask):
        mask = check_mask(mask, self.num_units)
        return mask, (dict(mask=mask) if is_traced_mask(mask) else {})

    def __call__(self, x, t, y=None, cache=None, mask=None, beta=None):
        mask, kw = self._mask_kw(mask)
        return self._jit("plain", mask)(self.on_devices().params, x, t, y, cache, beta=beta, **kw)

    def forward_with_cfg(self, x, t, y, cfg_scale, cache=None, mask=None, beta=None):
        mask, kw = self._mask_kw(mask)
        return self._jit("cfg", mask)(self.on_devices().params, x, t, y, cfg_scale, cache, beta=beta, **kw)

    @classmethod
    def random(cls, family: str, config, seed: int = 0, dtype=jnp.float32, mesh=None) -> "Model":
        """A randomly initialised model (the original's init is not reproduced; for tests and training),
        replicated over `mesh` (default: all devices)."""
        _, module_cls, example_inputs = family_of(family)
        x, t, y = (None if s is None else jnp.zeros(s.shape, s.dtype) for s in example_inputs(config))
        init = jax.jit(lambda k, x, t, y: module_cls(config).init(k, x, t, y)["params"],
                       out_shardings=parallel.replicated(mesh))
        return cls(family, config, init(jax.random.key(seed), x, t, y), dtype=dtype)

    def save(self, directory: str, overwrite: bool = False, **extra) -> None:
        checkpoint.write_model_dir(directory, self.family, dataclasses.asdict(self.config), self.params,
                                   overwrite=overwrite, **extra)


def config_of(directory: str, meta: dict):
    """The family config a model directory's config.json describes, checked against the architecture's rules."""
    config_cls = family_of(meta["family"]).config_cls
    try:
        return config_cls(**meta["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{os.path.join(directory, checkpoint.CONFIG_FILE)}: invalid model config: {e}") from None


def load_model(directory: str, dtype=jnp.float32, mesh=None) -> Model:
    """Restores a model written by `convert/` (or `Model.save`), its weights on the devices
    (replicated over `mesh`, default all devices), with no host copy kept."""
    meta = checkpoint.read_model_meta(directory)
    config = config_of(directory, meta)
    params = checkpoint.load_model_params(directory, meta, abstract_params(meta["family"], config), mesh=mesh)
    return Model(meta["family"], config, params, dtype=dtype)


def model_from_config(model_config, dtype=jnp.float32, abstract: bool = False, mesh=None) -> Model:
    """The model a config's `model` section names (the schema: l2c_jax/configs/common.py).

    `random_init=False`: the directory `checkpoint` (written by convert/ or
    `Model.save`), its own config; its family must be `family`.
    `random_init=True`: random weights (seed `init_seed`) of the released
    architecture `name` ("" = the family config's defaults) with the fields
    of `arch` that are not None. `abstract`: parameter shapes only (nothing
    read or initialised), for compile-only work. `mesh`: where the weights are
    replicated (default: all devices of all processes).
    """
    mc = model_config
    family = mc.get("family") or "dit"
    if not mc.get("random_init"):
        path = mc.get("checkpoint")
        if not path:
            raise ConfigError("config.model.checkpoint is empty: convert a checkpoint with convert/ first "
                              "(or set config.model.random_init=True)")
        if abstract:
            meta = checkpoint.read_model_meta(path)
            config = config_of(path, meta)
            model = Model(meta["family"], config, abstract_params(meta["family"], config), dtype=dtype)
        else:
            model = load_model(path, dtype=dtype, mesh=mesh)
        if mc.get("family") and model.family != mc.family:
            raise ConfigError(f"config.model.family is {mc.family!r}, but {path} holds a {model.family} model")
        return model
    config = architecture(mc)
    if abstract:
        return Model(family, config, abstract_params(family, config), dtype=dtype)
    return Model.random(family, config, int(mc.get("init_seed") or 0), dtype=dtype, mesh=mesh)


def architecture(model_config):
    """The family config a `model` section describes for a random init: `name`'s released
    architecture ("" = the config's defaults) with the fields of `arch` that are not None."""
    mc = model_config
    family = mc.get("family") or "dit"
    try:
        config_cls = family_of(family).config_cls
    except CheckpointError as e:
        raise ConfigError(f"config.model.family: {e}") from None
    fields = {f.name for f in dataclasses.fields(config_cls)}
    arch = mc.get("arch") or {}
    arch = {k: v for k, v in (arch.to_dict() if hasattr(arch, "to_dict") else dict(arch)).items() if v is not None}
    if set(arch) - fields:
        raise ConfigError(f"config.model.arch: {family} models have no field {', '.join(sorted(set(arch) - fields))} "
                          f"(known: {', '.join(sorted(fields))})")
    kw = {}
    if mc.get("name"):
        try:
            kw = dataclasses.asdict(config_cls.from_name(mc.name))
        except (KeyError, ConfigError):
            raise ConfigError(f"config.model.name: {mc.name!r} is no released {family} architecture") from None
    kw.update(arch)
    try:
        return config_cls(**kw)
    except TypeError as e:
        raise ConfigError(f"config.model.arch: {e}") from None
