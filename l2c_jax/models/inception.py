"""pytorch-fid's FID Inception-v3 (the 2015-12-05 TensorFlow graph as ported to PyTorch), in Flax.

The network is torchvision's `Inception3(num_classes=1008, aux_logits=False)`
with pytorch-fid's patched blocks (`fid_inception_v3`):

- Mixed_5b..5d (`FIDInceptionA`), Mixed_6b..6e (`FIDInceptionC`) and Mixed_7b
  (`FIDInceptionE_1`) average-pool their pool branch with
  `count_include_pad=False` (TensorFlow ignores the padded zeros);
- Mixed_7c (`FIDInceptionE_2`) max-pools its pool branch instead;
- Mixed_6a / Mixed_7a are torchvision's InceptionB / InceptionD unchanged.

Layout NHWC. Every `BasicConv2d` is a bias-free convolution, batch norm in
inference form (running statistics, eps 1e-3) and ReLU. Parameters are named
after the PyTorch attributes, so `l2c_jax.convert.rules.torch_to_flax`
converts a state dict with its generic rules alone:

  Mixed_5b.branch1x1.conv.weight     -> Mixed_5b/branch1x1/conv/kernel  (kh, kw, in, out)
  Mixed_5b.branch1x1.bn.weight       -> Mixed_5b/branch1x1/bn/scale
  Mixed_5b.branch1x1.bn.bias         -> Mixed_5b/branch1x1/bn/bias
  Mixed_5b.branch1x1.bn.running_mean -> Mixed_5b/branch1x1/bn/running_mean   (running_var alike)
  fc.weight / fc.bias                -> fc/kernel (2048, 1008) / fc/bias

(`num_batches_tracked` has no counterpart.) The input is already normalised:
the caller resizes and scales (pytorch-fid: `2 x - 1` of [0, 1] images; the
ADM evaluator: `(x - 128) / 128` of [0, 255] ones).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

BN_EPS = 1e-3
IMAGE_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7      # the ADM evaluator's sFID features: mixed_6/conv, first 7 channels
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BatchNormInference(nn.Module):
    """BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * scale + bias."""

    features: int
    eps: float = BN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = (self.features,)
        scale = self.param("scale", nn.initializers.ones, f, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, f, jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros, f, jnp.float32)
        var = self.param("running_var", nn.initializers.ones, f, jnp.float32)
        mul = scale * jax.lax.rsqrt(var + self.eps)
        return x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias, symmetric zero padding as PyTorch's), BN, ReLU."""

    features: int
    kernel_size: Any = 1
    stride: int = 1
    padding: Any = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv")(x)
        x = BatchNormInference(self.features, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def max_pool(x, window: int = 3, stride: int = 2, padding: int = 0):
    """F.max_pool2d: padding counts as -inf."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def avg_pool_exclude_pad(x, window: int = 3, padding: int = 1):
    """F.avg_pool2d(stride=1, count_include_pad=False): each mean over the in-image cells only."""
    dims, strides = (1, window, window, 1), (1, 1, 1, 1)
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), jnp.float32)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return total / count.astype(x.dtype)


class FIDInceptionA(nn.Module):
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = conv(64, 1, "branch1x1")(x)
        b5 = conv(48, 1, "branch5x5_1")(x)
        b5 = conv(64, 5, "branch5x5_2", 2)(b5)
        b3 = conv(64, 1, "branch3x3dbl_1")(x)
        b3 = conv(96, 3, "branch3x3dbl_2", 1)(b3)
        b3 = conv(96, 3, "branch3x3dbl_3", 1)(b3)
        bp = conv(self.pool_features, 1, "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = conv(384, 3, "branch3x3", 2)(x)
        bd = conv(64, 1, "branch3x3dbl_1")(x)
        bd = conv(96, 3, "branch3x3dbl_2", 1, 1)(bd)
        bd = conv(96, 3, "branch3x3dbl_3", 2)(bd)
        return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Returns (block output, branch1x1 output): the latter of Mixed_6d is the sFID feature map."""

    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        c7 = self.channels_7x7
        b1 = conv(192, 1, "branch1x1")(x)
        b7 = conv(c7, 1, "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), "branch7x7_2", (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7_3", (3, 0))(b7)
        bd = conv(c7, 1, "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), "branch7x7dbl_2", (3, 0))(bd)
        bd = conv(c7, (1, 7), "branch7x7dbl_3", (0, 3))(bd)
        bd = conv(c7, (7, 1), "branch7x7dbl_4", (3, 0))(bd)
        bd = conv(192, (1, 7), "branch7x7dbl_5", (0, 3))(bd)
        bp = conv(192, 1, "branch_pool")(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = conv(192, 1, "branch3x3_1")(x)
        b3 = conv(320, 3, "branch3x3_2", 2)(b3)
        b7 = conv(192, 1, "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), "branch7x7x3_2", 1, (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7x3_3", 1, (3, 0))(b7)
        b7 = conv(192, 3, "branch7x7x3_4", 2)(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (pool="avg": average pool without the padding) or FIDInceptionE_2 (pool="max")."""

    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = conv(320, 1, "branch1x1")(x)
        b3 = conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), "branch3x3_2a", (0, 1))(b3),
                              conv(384, (3, 1), "branch3x3_2b", (1, 0))(b3)], axis=-1)
        bd = conv(448, 1, "branch3x3dbl_1")(x)
        bd = conv(384, 3, "branch3x3dbl_2", 1)(bd)
        bd = jnp.concatenate([conv(384, (1, 3), "branch3x3dbl_3a", (0, 1))(bd),
                              conv(384, (3, 1), "branch3x3dbl_3b", (1, 0))(bd)], axis=-1)
        pooled = max_pool(x, 3, 1, 1) if self.pool == "max" else avg_pool_exclude_pad(x)
        bp = conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """x (B, 299, 299, 3), already normalised -> {"pool" (B, 2048), "spatial" (B, 2023), "logits" (B, 1008)}.

    All three outputs are float32 whatever `dtype` (the compute dtype of the
    convolutions; parameters stay float32). `spatial` is Mixed_6d.branch1x1
    (conv, BN, ReLU), its first 7 channels flattened in NHWC order; `logits`
    is fc(pool) with the bias.
    """

    dtype: Any = jnp.float32
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        x = jnp.asarray(x, d)
        x = BasicConv2d(32, 3, stride=2, dtype=d, name="Conv2d_1a_3x3")(x)   # 149
        x = BasicConv2d(32, 3, dtype=d, name="Conv2d_2a_3x3")(x)             # 147
        x = BasicConv2d(64, 3, padding=1, dtype=d, name="Conv2d_2b_3x3")(x)  # 147
        x = max_pool(x)                                                       # 73
        x = BasicConv2d(80, 1, dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, dtype=d, name="Conv2d_4a_3x3")(x)            # 71
        x = max_pool(x)                                                       # 35
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pf, dtype=d, name=name)(x)
        x = InceptionB(dtype=d, name="Mixed_6a")(x)                           # 17
        spatial = None
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x, b1 = FIDInceptionC(c7, dtype=d, name=name)(x)
            if name == "Mixed_6d":
                spatial = b1[..., :SPATIAL_CHANNELS]
        x = InceptionD(dtype=d, name="Mixed_7a")(x)                           # 8
        x = FIDInceptionE("avg", dtype=d, name="Mixed_7b")(x)
        x = FIDInceptionE("max", dtype=d, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="fc")(pool)
        b = pool.shape[0]
        return {"pool": pool, "spatial": spatial.astype(jnp.float32).reshape(b, -1),
                "logits": logits.astype(jnp.float32)}


def example_input(batch: int = 1):
    return jnp.zeros((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)


def abstract_inception_params(num_classes: int = NUM_CLASSES) -> Any:
    """The params tree as ShapeDtypeStructs (no weights computed)."""
    module = FIDInceptionV3(num_classes=num_classes)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example_input())
    return shapes["params"]


def param_count(params: Any) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(params))


__all__: Sequence[str] = ("FIDInceptionV3", "BasicConv2d", "abstract_inception_params", "example_input",
                          "IMAGE_SIZE", "POOL_DIM", "SPATIAL_DIM", "NUM_CLASSES")
