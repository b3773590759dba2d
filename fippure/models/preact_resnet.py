"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", 2016).

The CIFAR variant of the seed papers: a 3x3 stem, four stages of two pre-activation blocks,
a final BN-ReLU, global average pooling and a dense ``head``. ``width`` is the stem width (64
in the papers, 16 at fippure's CPU scale: 0.7M parameters). Weights start from Flax's default
initialisers (LeCun normal for convolutions and the dense layer), not PyTorch's (Kaiming
uniform with a = sqrt(5)). 11,172,170 parameters at width 64. BackdoorBench's PreAct-ResNet-18
has the same blocks and shortcuts but no final BN-ReLU (it pools the last block's output
directly), so it has 1,024 parameters fewer (11,171,146) and its weights do not map one to one
onto this module's ``bn_final``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.models.layers import FEATURES, BatchNorm, ComputeDtype, as_output, compute_dtype


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus an identity or 1x1-conv shortcut."""

    features: int
    strides: int = 1
    dtype: ComputeDtype | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Array:
        dtype = compute_dtype(self.dtype)
        norm = lambda name: BatchNorm(use_running_average=not train, dtype=dtype, name=name)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
        out = nn.relu(norm("bn1")(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), self.strides, name="shortcut")(out)
        out = conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(out)
        out = nn.relu(norm("bn2")(out))
        out = conv(self.features, (3, 3), padding=1, name="conv2")(out)
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for small images.

    Attributes:
        num_classes: size of the output layer.
        width: channels of the stem and first stage (stages use 1x, 2x, 4x, 8x).
        dtype: computation dtype of activations and of the conv/matmul arithmetic
            (``"bfloat16"`` or ``"float16"`` for mixed precision). Parameters and BatchNorm
            statistics stay float32 and logits are returned in float32. ``None`` (default)
            follows the inputs and parameters.
    """

    num_classes: int = 10
    width: int = 64
    dtype: ComputeDtype | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        dtype = compute_dtype(self.dtype)
        out = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=dtype, name="stem")(x)
        for stage, multiple in enumerate((1, 2, 4, 8), start=1):
            for block in (1, 2):
                strides = 2 if stage > 1 and block == 1 else 1
                out = PreActBlock(
                    self.width * multiple, strides, self.dtype, name=f"stage{stage}_block{block}"
                )(out, train)
        out = nn.relu(BatchNorm(use_running_average=not train, dtype=dtype, name="bn_final")(out))
        features = as_output(jnp.mean(out, axis=(1, 2)), dtype)
        self.sow("intermediates", FEATURES, features)
        return as_output(nn.Dense(self.num_classes, dtype=dtype, name="head")(features), dtype)
