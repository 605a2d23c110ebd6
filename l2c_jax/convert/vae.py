"""KL autoencoder checkpoints (diffusers or LDM naming) -> the Flax `AutoencoderKL` tree.

Two namings of the same weights are in circulation:

- LDM / CompVis (U-ViT's `autoencoder_kl_ema.pth`, Stable Diffusion `.ckpt`
  files under `first_stage_model.`): `encoder.down.N.block.M`,
  `encoder.mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convolutions,
  `decoder.up.N` indexed by resolution level.
- diffusers (`diffusion_pytorch_model.safetensors` of sd-vae-ft-ema/-mse):
  `encoder.down_blocks.N.resnets.M`, `mid_block.attentions.0.{group_norm,
  to_q,to_k,to_v,to_out.0}` as Linear (older exports: `query/key/value/
  proj_attn`), `conv_shortcut`, `conv_norm_out`, and `decoder.up_blocks.J`
  in execution order, i.e. level `len(ch_mult) - 1 - J`.

The Flax tree follows the LDM naming (see `l2c_jax.models.vae`). Rather than
rewriting keys one pattern at a time, the expected key of every Flax leaf is
generated in the checkpoint's own naming; the check of missing, unexpected
and mis-shaped keys is done against that, so errors name keys as the file
spells them. The weights, renamed to LDM keys, then go through the generic
`torch_to_flax` (layout transposes and its own strict check).
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

from l2c_jax.convert.rules import flatten_tree
from l2c_jax.errors import CheckpointError, ConfigError
from l2c_jax.models.vae import VAEConfig, abstract_vae_params
from l2c_jax.torch_io import load_checkpoint_file, select_state_dict, strip_prefix

LDM, DIFFUSERS = "ldm", "diffusers"
_TOP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_SD_PREFIX = "first_stage_model."

_PATTERNS = {
    LDM: dict(
        marker=re.compile(r"^(encoder|decoder)\.(down|up|mid)\."),
        enc_block=re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."),
        enc_attn=re.compile(r"^encoder\.down\.(\d+)\.attn\.\d+\."),
        dec_attn=re.compile(r"^decoder\.up\.(\d+)\.attn\.\d+\."),
        conv1="encoder.down.{i}.block.0.conv1.weight",
    ),
    DIFFUSERS: dict(
        marker=re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\."),
        enc_block=re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\."),
        enc_attn=re.compile(r"^encoder\.down_blocks\.(\d+)\.attentions\.\d+\."),
        dec_attn=re.compile(r"^decoder\.up_blocks\.(\d+)\.attentions\.\d+\."),
        conv1="encoder.down_blocks.{i}.resnets.0.conv1.weight",
    ),
}
_LEGACY_ATTN = re.compile(r"\.attentions\.\d+\.(query|key|value|proj_attn)\.")

_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_DIFFUSERS_ATTN = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def prepare_state_dict(sd: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Keeps the autoencoder's keys; returns them and notes on what was dropped.

    A full Stable Diffusion checkpoint holds the autoencoder under
    `first_stage_model.`; an LDM autoencoder training checkpoint carries its
    discriminator and LPIPS weights under `loss.`, which inference never uses.
    Anything else is left for the strict check to report.
    """
    sd = strip_prefix(sd)
    notes = []
    if any(k.startswith(_SD_PREFIX) for k in sd):
        kept = {k[len(_SD_PREFIX):]: v for k, v in sd.items() if k.startswith(_SD_PREFIX)}
        if len(kept) < len(sd):
            notes.append(f"took the {len(kept)} {_SD_PREFIX}* weights, ignored {len(sd) - len(kept)} other keys")
        sd = kept
    dropped = [k for k in sd if k.startswith("loss.")]
    if dropped:
        notes.append(f"dropped {len(dropped)} training-loss keys (loss.*), not part of the autoencoder")
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return sd, notes


def detect_naming(sd: Dict[str, np.ndarray], path: str = "checkpoint") -> Tuple[str, bool]:
    """('ldm' | 'diffusers', legacy_attention_names) read off the keys."""
    has = {n: any(p["marker"].match(k) for k in sd) for n, p in _PATTERNS.items()}
    if has[LDM] and has[DIFFUSERS]:
        raise CheckpointError(f"{path}: keys mix the LDM naming (encoder.down.N...) and the diffusers naming "
                              f"(encoder.down_blocks.N...)")
    if not (has[LDM] or has[DIFFUSERS]):
        sample = ", ".join(sorted(sd)[:4]) or "no keys"
        raise CheckpointError(f"{path}: not a KL autoencoder checkpoint: no encoder.down.*/encoder.down_blocks.* "
                              f"keys (found {sample})")
    naming = LDM if has[LDM] else DIFFUSERS
    legacy = naming == DIFFUSERS and any(_LEGACY_ATTN.search(k) for k in sd)
    return naming, legacy


def _need(sd, key, path):
    if key not in sd:
        raise CheckpointError(f"{path}: not a complete KL autoencoder, missing key {key}")
    return np.asarray(sd[key])


def infer_vae_config(sd: Dict[str, np.ndarray], naming: str, path: str = "checkpoint") -> VAEConfig:
    """Channels, multipliers, res-blocks, attention levels, z / embed widths from the weights.

    The group count of GroupNorm is not in the weights; it is 32 in every
    released model.
    """
    pat = _PATTERNS[naming]
    conv_in = _need(sd, "encoder.conv_in.weight", path)
    if conv_in.ndim != 4:
        raise CheckpointError(f"{path}: encoder.conv_in.weight has shape {conv_in.shape}, expected (ch, in, 3, 3)")
    ch, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])

    blocks: Dict[int, set] = {}
    for k in sd:
        m = pat["enc_block"].match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        raise CheckpointError(f"{path}: no encoder res-blocks found")
    n_levels = max(blocks) + 1
    num_res_blocks = len(blocks.get(0, ()))

    ch_mult = []
    for i in range(n_levels):
        key = pat["conv1"].format(i=i)
        out = int(_need(sd, key, path).shape[0])
        if out % ch:
            raise CheckpointError(f"{path}: {key} gives {out} channels, not a multiple of the base width {ch}")
        ch_mult.append(out // ch)

    def levels(rx, reverse):
        found = {int(m.group(1)) for k in sd if (m := rx.match(k))}
        return tuple(sorted(n_levels - 1 - j if reverse else j for j in found))

    enc_attn = levels(pat["enc_attn"], False)
    dec_attn = levels(pat["dec_attn"], naming == DIFFUSERS)

    enc_out = int(_need(sd, "encoder.conv_out.weight", path).shape[0])
    z = int(_need(sd, "decoder.conv_in.weight", path).shape[1])
    if enc_out != 2 * z:
        raise CheckpointError(f"{path}: encoder.conv_out gives {enc_out} channels, expected mean and log-variance "
                              f"of the decoder's {z} latent channels ({2 * z})")
    quant = int(_need(sd, "quant_conv.weight", path).shape[0])
    if quant % 2:
        raise CheckpointError(f"{path}: quant_conv gives {quant} channels, expected mean and log-variance (even)")
    out_ch = int(_need(sd, "decoder.conv_out.weight", path).shape[0])
    try:
        return VAEConfig(in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=tuple(ch_mult),
                         num_res_blocks=num_res_blocks, z_channels=z, embed_dim=quant // 2,
                         encoder_attn_levels=enc_attn, decoder_attn_levels=dec_attn)
    except ConfigError as e:  # e.g. widths GroupNorm(32) cannot split: a bad file, not a bad option.
        raise CheckpointError(f"{path}: {e}") from None


def source_key(flax_path: Tuple[str, ...], naming: str, n_levels: int, legacy: bool = False) -> str:
    """The checkpoint key of one Flax leaf in the given naming."""
    *mods, leaf = flax_path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    out, rest = [mods[0]], list(mods[1:])
    in_attn = False
    if rest:
        head, rest = rest[0], rest[1:]
        lvl = re.fullmatch(r"(down|up)_(\d+)", head)
        if lvl:
            kind, n = lvl.group(1), int(lvl.group(2))
            sub, rest = rest[0], rest[1:]
            blk = re.fullmatch(r"(block|attn)_(\d+)", sub)
            in_attn = bool(blk) and blk.group(1) == "attn"
            if naming == LDM:
                out += [kind, str(n)] + ([blk.group(1), blk.group(2)] if blk else [sub])
            else:
                out += [f"{kind}_blocks", str(n_levels - 1 - n if kind == "up" else n)]
                out += ([{"block": "resnets", "attn": "attentions"}[blk.group(1)], blk.group(2)] if blk
                        else [f"{sub}rs", "0"])  # downsample -> downsamplers.0
        elif head == "mid":
            sub, rest = rest[0], rest[1:]
            in_attn = sub == "attn_1"
            if naming == LDM:
                out += ["mid", sub]
            else:
                out += ["mid_block"] + {"block_1": ["resnets", "0"], "block_2": ["resnets", "1"],
                                        "attn_1": ["attentions", "0"]}[sub]
        elif head == "norm_out" and naming == DIFFUSERS:
            out.append("conv_norm_out")
        else:
            out.append(head)
    if naming == DIFFUSERS:
        names = _LEGACY_DIFFUSERS_ATTN if legacy else _DIFFUSERS_ATTN
        rest = [names.get(r, r) if in_attn else ("conv_shortcut" if r == "nin_shortcut" else r) for r in rest]
    return ".".join(out + rest + [leaf])


def _torch_shape(flax_path, shape, naming):
    if flax_path[-1] == "kernel" and len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if flax_path[-1] == "kernel" and len(shape) == 2:
        i, o = shape
        return (o, i, 1, 1) if naming == LDM else (o, i)
    return tuple(shape)


def expected_keys(config: VAEConfig, naming: str, legacy: bool = False) -> Dict[str, Tuple[Tuple[str, ...], tuple]]:
    """{checkpoint key: (Flax path, PyTorch shape)} for every parameter of `config`."""
    n = len(config.ch_mult)
    return {source_key(p, naming, n, legacy): (p, _torch_shape(p, tuple(a.shape), naming))
            for p, a in flatten_tree(abstract_vae_params(config)).items()}


def vae_params_from_state_dict(sd: Dict[str, np.ndarray], path: str = "checkpoint"):
    """A state dict in either naming -> (VAEConfig, Flax params, naming, notes)."""
    from l2c_jax.convert.rules import mismatch_report, torch_to_flax

    sd, notes = prepare_state_dict(sd)
    naming, legacy = detect_naming(sd, path)
    config = infer_vae_config(sd, naming, path)
    expected = expected_keys(config, naming, legacy)

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} {tuple(np.shape(v))} (expected {expected[k][1]})" for k, v in sd.items()
                 if k in expected and tuple(np.shape(v)) != expected[k][1]]
    problems = mismatch_report(missing, unexpected, misshaped)
    if problems:
        raise CheckpointError(f"{path} ({naming} naming) does not match the KL autoencoder its weights describe "
                              f"(ch {config.ch}, ch_mult {list(config.ch_mult)}, {config.num_res_blocks} res-blocks): "
                              + problems)

    # LDM keys are the Flax paths under the generic rules; attention 1x1
    # convolutions become the (out, in) matrices of a Linear first.
    n = len(config.ch_mult)
    renamed = {}
    for key, (flax_path, _) in expected.items():
        v = np.asarray(sd[key])
        if v.ndim == 4 and flax_path[-2] in ("q", "k", "v", "proj_out"):
            v = v[:, :, 0, 0]
        renamed[source_key(flax_path, LDM, n)] = v
    params = torch_to_flax(renamed, abstract_vae_params(config), source=path)
    return config, params, naming, notes


def convert_vae(checkpoint: str):
    """Reads a KL autoencoder checkpoint file -> (`VAE`, naming, notes)."""
    from l2c_jax.vae import VAE

    sd = select_state_dict(load_checkpoint_file(checkpoint), checkpoint, prefer=("state_dict", "ema", "model"))
    config, params, naming, notes = vae_params_from_state_dict(sd, checkpoint)
    return VAE(config, params), naming, notes


def vae_state_dict(params, config: VAEConfig, naming: str = DIFFUSERS, legacy: bool = False) -> Dict[str, np.ndarray]:
    """The inverse: Flax params -> a state dict in the given naming (NumPy), e.g. to export or compare."""
    n = len(config.ch_mult)
    out = {}
    for path, v in flatten_tree(params).items():
        v = np.asarray(v)
        if path[-1] == "kernel":
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            if naming == LDM and v.ndim == 2:
                v = v[:, :, None, None]
        out[source_key(path, naming, n, legacy)] = v
    return out
