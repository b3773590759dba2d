"""VGG with batch normalisation (Simonyan and Zisserman, 2015), CIFAR variant.

Convolutions 3x3 with BN-ReLU, max-pooling between groups, global average pooling and a dense
``head`` (as in the common CIFAR code, instead of the ImageNet 4096-wide classifier).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.errors import InvalidInputError
from fippure.models.layers import FEATURES, BatchNorm, ComputeDtype, as_output, compute_dtype

LAYOUTS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-``depth``-BN.

    Attributes:
        num_classes: size of the output layer.
        depth: 11 or 16.
        width: channels of the first conv (64 in the original; others scale with it).
        dtype: computation dtype of activations and of the conv/matmul arithmetic
            (``"bfloat16"`` or ``"float16"`` for mixed precision). Parameters and BatchNorm
            statistics stay float32 and logits are returned in float32. ``None`` (default)
            follows the inputs and parameters.
    """

    num_classes: int = 10
    depth: int = 11
    width: int = 64
    dtype: ComputeDtype | None = None

    def __post_init__(self):
        if self.depth not in LAYOUTS:
            raise InvalidInputError(f"vgg depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        dtype = compute_dtype(self.dtype)
        conv_index = 0
        for item in LAYOUTS[self.depth]:
            if item == "M":
                if x.shape[1] >= 2:  # small inputs (e.g. 8x8 digits) run out of resolution
                    x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            conv_index += 1
            channels = max(1, item * self.width // 64)
            x = nn.Conv(
                channels, (3, 3), padding=1, use_bias=False, dtype=dtype, name=f"conv{conv_index}"
            )(x)
            x = BatchNorm(use_running_average=not train, dtype=dtype, name=f"bn{conv_index}")(x)
            x = nn.relu(x)
        features = as_output(jnp.mean(x, axis=(1, 2)), dtype)
        self.sow("intermediates", FEATURES, features)
        return as_output(nn.Dense(self.num_classes, dtype=dtype, name="head")(features), dtype)
