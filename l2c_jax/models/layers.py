"""Building blocks shared by the transformer models (NHWC / token-major)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def layer_norm(x, eps: float):
    """Non-affine LayerNorm over the last axis, variance of centred values (as PyTorch)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    xc = x32 - mean
    var = (xc * xc).mean(-1, keepdims=True)
    return (xc * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class LayerNorm(nn.Module):
    """Affine LayerNorm with PyTorch's parameter names (`weight` -> scale, `bias`)."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        return layer_norm(x, self.eps) * scale.astype(x.dtype) + bias.astype(x.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0, freq_shift: int = 0):
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], as GLIDE / DiT.

    freq_shift: the exponent is divided by `half - freq_shift`; 0 is the original
    DiT (and GLIDE), 1 is diffusers' `Timesteps(downscale_freq_shift=1)` of its DiT.
    """
    half = dim // 2
    # Constants, computed as the PyTorch codes do (the exponent in float32) and then rounded correctly:
    # PyTorch's float32 exp nearly always is, XLA's is an ulp off for ~15 of the 128 and NumPy's for ~55,
    # and timesteps up to 999 amplify one ulp of a frequency into a 1e-5 difference of the whole forward.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table of MAE / DiT, (grid_size**2, embed_dim).

    Half of the channels encode the row, half the column; computed in float64
    and rounded once, as the original does.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position table needs a width divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # the original's meshgrid(w, h): first grid varies along columns

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # The original feeds grid[0] (= the w coordinates) into the first half.
    return np.concatenate([one_d(embed_dim // 2, col), one_d(embed_dim // 2, row)], axis=1).astype(np.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (B, h*w, D), row-major as PyTorch's flatten."""

    hidden_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout)."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        h = self.num_heads
        qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        # timm's layout: channels are (3, heads, head_dim); one transpose to head-major for all three.
        qkv = qkv.reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        out = attention_heads_major(qkv[0], qkv[1], qkv[2])              # (B, H, N, hd)
        out = out.transpose(0, 2, 1, 3).reshape(b, n, c)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)


def attention_heads_major(q, k, v):
    """softmax(q k^T / sqrt(d)) v over (B, H, N, hd); scores, exponentials and row sums in float32.

    The row normalisation is applied to the (N, hd) output rather than to the
    (N, N) weights: the same numbers, but XLA:CPU then runs attention 2-3x
    faster than `softmax` followed by the value product (docs/performance.md, section 5), and
    it is the form flash attention uses.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.matmul(q * jnp.asarray(scale, q.dtype), jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.matmul(e.astype(v.dtype), v).astype(jnp.float32) / e.sum(-1, keepdims=True)
    return out.astype(v.dtype)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp)."""

    hidden: int
    out: int
    approximate_gelu: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = jax.nn.gelu(x, approximate=self.approximate_gelu)
        return nn.Dense(self.out, dtype=self.dtype, name="fc2")(x)
