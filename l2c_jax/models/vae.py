"""The KL-regularised autoencoder of latent diffusion (Stable Diffusion's "KL-f8"), in Flax.

This is the architecture of `stabilityai/sd-vae-ft-ema` / `sd-vae-ft-mse` and
of U-ViT's `autoencoder_kl_ema.pth`. The parameter tree uses one naming, the
LDM one, whatever checkpoint it came from:

  encoder/conv_in
  encoder/down_N/block_M/{norm1,conv1,norm2,conv2,nin_shortcut}
  encoder/down_N/attn_M/{norm,q,k,v,proj_out}      (only at `encoder_attn_levels`)
  encoder/down_N/downsample/conv                   (every level but the last)
  encoder/mid/{block_1,attn_1,block_2}
  encoder/norm_out, encoder/conv_out
  decoder/conv_in, decoder/mid/...
  decoder/up_N/block_M/...   (num_res_blocks + 1 per level; N is the level,
                              0 = full resolution, run from the deepest up)
  decoder/up_N/upsample/conv                       (every level but 0)
  decoder/norm_out, decoder/conv_out
  quant_conv, post_quant_conv

Attention projections are Dense layers (the LDM checkpoints store them as 1x1
convolutions, diffusers as Linear; both are the same matrix). Images and
latents are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2c_jax.errors import ConfigError

GROUPNORM_EPS = 1e-6
# The originals clamp the posterior's log-variance to keep exp() finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    # Levels (0 = full resolution) whose res-blocks are each followed by
    # attention; the released f8 models have none besides the mid block.
    encoder_attn_levels: Tuple[int, ...] = ()
    decoder_attn_levels: Tuple[int, ...] = ()
    norm_groups: int = 32
    # Not applied by the model: samplers multiply encoded latents by it and
    # divide by it before decoding (Stable Diffusion's latent scale).
    scaling_factor: float = 0.18215

    def __post_init__(self):
        # JSON gives lists; a frozen dataclass must stay hashable for Flax.
        for name in ("ch_mult", "encoder_attn_levels", "decoder_attn_levels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not self.ch_mult:
            raise ConfigError("VAE config: ch_mult is empty")
        for c in [self.ch * m for m in self.ch_mult] + [self.ch]:
            if c % self.norm_groups:
                raise ConfigError(f"VAE config: {c} channels not divisible into {self.norm_groups} groups")
        for name in ("encoder_attn_levels", "decoder_attn_levels"):
            bad = [lv for lv in getattr(self, name) if not 0 <= lv < len(self.ch_mult)]
            if bad:
                raise ConfigError(f"VAE config: {name} {bad} outside levels 0..{len(self.ch_mult) - 1}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"VAE config: unknown fields {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC with PyTorch's statistics (biased variance of centred values), in float32."""

    groups: int
    eps: float = GROUPNORM_EPS

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x32 = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = x32.mean(axis=(1, 2, 4), keepdims=True)
        xc = x32 - mean
        var = (xc * xc).mean(axis=(1, 2, 4), keepdims=True)
        y = (xc * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * scale + bias).astype(x.dtype)


def _conv(features, kernel, name, dtype, stride=1, padding=None):
    pad = padding if padding is not None else [(kernel // 2, kernel // 2)] * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    out_ch: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(GroupNorm(self.groups, name="norm1")(x))
        h = _conv(self.out_ch, 3, "conv1", self.dtype)(h)
        h = nn.silu(GroupNorm(self.groups, name="norm2")(h))
        h = _conv(self.out_ch, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, 1, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = GroupNorm(self.groups, name="norm")(x)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
        return x + dense("proj_out")(out)


class Downsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # The originals pad only right/bottom before a stride-2 VALID conv;
        # symmetric padding would shift every latent by half a pixel.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class Level(nn.Module):
    """The res-blocks (each optionally followed by attention) of one resolution, then resampling."""

    out_ch: int
    num_blocks: int
    attn: bool
    resample: Optional[str]  # "down", "up" or None
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for m in range(self.num_blocks):
            x = ResnetBlock(self.out_ch, self.groups, self.dtype, name=f"block_{m}")(x)
            if self.attn:
                x = AttnBlock(self.groups, self.dtype, name=f"attn_{m}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class MidBlock(nn.Module):
    ch: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.ch, self.groups, self.dtype, name="block_1")(x)
        x = AttnBlock(self.groups, self.dtype, name="attn_1")(x)
        return ResnetBlock(self.ch, self.groups, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        n = len(c.ch_mult)
        h = _conv(c.ch, 3, "conv_in", self.dtype)(x.astype(self.dtype))
        for i, mult in enumerate(c.ch_mult):
            h = Level(c.ch * mult, c.num_res_blocks, i in c.encoder_attn_levels,
                      "down" if i != n - 1 else None, c.norm_groups, self.dtype, name=f"down_{i}")(h)
        h = MidBlock(c.ch * c.ch_mult[-1], c.norm_groups, self.dtype, name="mid")(h)
        h = nn.silu(GroupNorm(c.norm_groups, name="norm_out")(h))
        return _conv(2 * c.z_channels, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c = self.config
        h = _conv(c.ch * c.ch_mult[-1], 3, "conv_in", self.dtype)(z.astype(self.dtype))
        h = MidBlock(c.ch * c.ch_mult[-1], c.norm_groups, self.dtype, name="mid")(h)
        for i in reversed(range(len(c.ch_mult))):
            h = Level(c.ch * c.ch_mult[i], c.num_res_blocks + 1, i in c.decoder_attn_levels,
                      "up" if i != 0 else None, c.norm_groups, self.dtype, name=f"up_{i}")(h)
        h = nn.silu(GroupNorm(c.norm_groups, name="norm_out")(h))
        return _conv(c.out_channels, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        self.quant_conv = nn.Conv(2 * c.embed_dim, (1, 1), dtype=self.dtype)
        self.post_quant_conv = nn.Conv(c.z_channels, (1, 1), dtype=self.dtype)

    def moments(self, images):
        """quant_conv output: mean and (unclamped) log-variance stacked on channels, float32."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def encode(self, images):
        """images (B,H,W,in_channels) in [-1, 1] -> (mean, logvar), each (B,H/f,W/f,embed_dim)."""
        mean, logvar = jnp.split(self.moments(images), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents):
        """latents (B,h,w,embed_dim), unscaled -> images (B,h*f,w*f,out_channels), float32."""
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)


def example_input(config: VAEConfig, batch: int = 1):
    """The smallest image the encoder takes: parameter shapes do not depend on the size."""
    s = config.downsample_factor
    return jax.ShapeDtypeStruct((batch, s, s, config.in_channels), jnp.float32)


def abstract_vae_params(config: VAEConfig) -> Any:
    """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
    module = AutoencoderKL(config)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), example_input(config))["params"]


def init_vae_params(config: VAEConfig, seed: int = 0) -> Any:
    """Random parameters of the right shapes (for tests and shape checks), drawn with NumPy.

    Compiling Flax's `init` costs far more than drawing the numbers (seconds
    per config on a CPU); kernels get a 1/sqrt(fan_in) scale so activations
    stay O(1) through the depth, and every norm scale and bias is perturbed
    so no parameter is inert.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(a.shape[:-1]))
            return (rng.standard_normal(a.shape, np.float32) / np.sqrt(fan_in)).astype(np.float32)
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.1 * rng.standard_normal(a.shape, np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_vae_params(config))
