"""`Model`: a Flax module, its config and its parameters behind the API.md call.

`model(x, t, y, cache=None, mask=None, beta=None) -> (out, cache)` jits once
per distinct static mask. `model.apply(params, ...)` is the same computation
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
from l2c_jax.models.cache import check_mask
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
        key = (kind, mask)
        if key not in self._jitted:
            fn = self.apply if kind == "plain" else self.apply_cfg
            self._jitted[key] = jax.jit(functools.partial(fn, mask=mask))
        return self._jitted[key]

    def __call__(self, x, t, y=None, cache=None, mask=None, beta=None):
        mask = check_mask(mask, self.num_units)
        return self._jit("plain", mask)(self.on_devices().params, x, t, y, cache, beta=beta)

    def forward_with_cfg(self, x, t, y, cfg_scale, cache=None, mask=None, beta=None):
        mask = check_mask(mask, self.num_units)
        return self._jit("cfg", mask)(self.on_devices().params, x, t, y, cfg_scale, cache, beta=beta)

    @classmethod
    def random(cls, family: str, config, seed: int = 0, dtype=jnp.float32) -> "Model":
        """A randomly initialised model (the original's init is not reproduced; for tests and training)."""
        _, module_cls, example_inputs = family_of(family)
        x, t, y = (None if s is None else jnp.zeros(s.shape, s.dtype) for s in example_inputs(config))
        init = jax.jit(lambda k, x, t, y: module_cls(config).init(k, x, t, y)["params"],
                       out_shardings=parallel.replicated())
        return cls(family, config, init(jax.random.key(seed), x, t, y), dtype=dtype)

    def save(self, directory: str, overwrite: bool = False, **extra) -> None:
        checkpoint.write_model_dir(directory, self.family, dataclasses.asdict(self.config), self.params,
                                   overwrite=overwrite, **extra)


def load_model(directory: str, dtype=jnp.float32, mesh=None) -> Model:
    """Restores a model written by `convert/` (or `Model.save`), its weights on the devices
    (replicated over `mesh`, default all devices), with no host copy kept."""
    meta = checkpoint.read_model_meta(directory)
    config_cls, _, _ = family_of(meta["family"])
    try:
        config = config_cls(**meta["config"])
    except TypeError as e:
        raise CheckpointError(f"{directory}: invalid model config: {e}") from None
    params = checkpoint.restore_params(os.path.join(directory, checkpoint.PARAMS_DIR),
                                       abstract_params(meta["family"], config), mesh=mesh)
    return Model(meta["family"], config, params, dtype=dtype)


def model_from_config(model_config, dtype=jnp.float32) -> Model:
    """The model a config's `model` section names: a converted checkpoint directory, or
    (`random_init`, with `arch`) a randomly initialised DiT for smoke tests."""
    if model_config.get("random_init"):
        from l2c_jax.models.dit import DiTConfig
        return Model.random("dit", DiTConfig(**model_config.arch.to_dict()), model_config.get("init_seed", 0))
    if not model_config.get("checkpoint"):
        raise ConfigError("config.model.checkpoint is empty: convert a checkpoint with convert/ first")
    return load_model(model_config.checkpoint, dtype=dtype)
