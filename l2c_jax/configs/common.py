"""What the configs share, as big_vision's `configs/common.py`: the one `model` schema and variant parsing.

Not a config itself (it has no `get_config`); the config files import it as
`from l2c_jax.configs import common`.

The `model` section of every config (read by `l2c_jax.model.model_from_config`,
the benchmark's `l2c_jax.bench.harness.build_model`, and train_dit's `arch`):

    model.family       "dit" | "uvit"
    model.checkpoint   a directory written by convert/ (or Model.save); loaded unless random_init.
                       The checkpoint's own config.json fixes the architecture; its family must be `family`.
    model.name         a released architecture ("DiT-XL/2", "U-ViT-H/2"), or "" for the family config's defaults:
                       the base of a random init
    model.arch         every field of the family's config (DiTConfig / UViTConfig); None = `name`'s value
                       (or the default). Any of them is settable from the command line, e.g.
                       `--config.model.arch.depth=2`.
    model.random_init  True: random weights of `name` + `arch` (smoke tests, benchmarks, train_dit),
                       no checkpoint read
    model.init_seed    the random init's seed
"""

from __future__ import annotations

import dataclasses

import ml_collections

from l2c_jax.models.families import family_of

MODEL_KEYS = ("family", "checkpoint", "name", "arch", "random_init", "init_seed")


def arch(family: str, **fields) -> ml_collections.ConfigDict:
    """Every field of `family`'s config as a typed placeholder: None (= from `model.name`) unless given."""
    out = ml_collections.ConfigDict()
    known = {f.name: f for f in dataclasses.fields(family_of(family).config_cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{family} architectures have no field {', '.join(unknown)}; known: {', '.join(known)}")
    for name, f in known.items():
        out[name] = ml_collections.config_dict.placeholder(type(f.default))
        if fields.get(name) is not None:
            out[name] = fields[name]
    return out


def model(family: str = "dit", checkpoint: str = "", name: str = "", arch_fields: dict | None = None,
          random_init: bool = False, init_seed: int = 0) -> ml_collections.ConfigDict:
    """The `model` section (schema above); `arch_fields` fill `model.arch`."""
    return ml_collections.ConfigDict(dict(
        family=family, checkpoint=checkpoint, name=name, arch=arch(family, **(arch_fields or {})),
        random_init=bool(random_init), init_seed=int(init_seed)))


def variant(arg, default: str) -> str:
    """The variant text after `file.py:`; `default` when there is none."""
    arg = "" if arg is None else str(arg).strip()
    return arg or default


def unknown(config: str, arg: str, forms) -> ValueError:
    """The error of an unknown variant: one line naming the known forms."""
    return ValueError(f"configs/{config}: unknown variant {arg!r}; known: {'; '.join(forms)}")


IMAGE_FREE = "_imagefree"


def split_image_free(arg: str) -> tuple[str, bool]:
    """("xl2_256_ddim20", True) from "xl2_256_ddim20_imagefree": the router-config suffix for image-free training."""
    return (arg[:-len(IMAGE_FREE)], True) if arg.endswith(IMAGE_FREE) else (arg, False)


def image_free(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A router-training config trained on the model's own trajectories instead of a dataset: no image or latent
    source and no autoencoder (the states are latents already), the trajectories recorded into
    WORKDIR/trajectories (`l2c_jax.training.trajectories`)."""
    for key in ("image_folder", "tfds_name", "latents"):
        c.data[key] = ""
    if "vae" in c:
        c.vae.checkpoint = ""
    c.data.trajectories = "workdir"
    return c
