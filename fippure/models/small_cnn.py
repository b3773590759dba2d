"""A small BN convnet for tiny images (scikit-learn's 8x8 digits) and fast tests."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.models.layers import FEATURES, BatchNorm, ComputeDtype, as_output, compute_dtype


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, global average pool, dense ``head``.

    Attributes:
        num_classes: size of the output layer.
        width: channels of the first conv (later ones use 2x).
        dtype: computation dtype of activations and of the conv/matmul arithmetic
            (``"bfloat16"`` or ``"float16"`` for mixed precision). Parameters and BatchNorm
            statistics stay float32 and logits are returned in float32. ``None`` (default)
            follows the inputs and parameters.
    """

    num_classes: int = 10
    width: int = 16
    dtype: ComputeDtype | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        dtype = compute_dtype(self.dtype)
        norm = lambda name: BatchNorm(use_running_average=not train, dtype=dtype, name=name)
        conv = lambda features, name: nn.Conv(
            features, (3, 3), use_bias=False, dtype=dtype, name=name
        )
        x = nn.relu(norm("bn1")(conv(self.width, "conv1")(x)))
        x = nn.relu(norm("bn2")(conv(2 * self.width, "conv2")(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(norm("bn3")(conv(2 * self.width, "conv3")(x)))
        features = as_output(jnp.mean(x, axis=(1, 2)), dtype)
        self.sow("intermediates", FEATURES, features)
        return as_output(nn.Dense(self.num_classes, dtype=dtype, name="head")(features), dtype)
