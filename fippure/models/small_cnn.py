"""A small BN convnet for tiny images (scikit-learn's 8x8 digits) and fast tests."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.models.layers import FEATURES, BatchNorm


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, global average pool, dense ``head``.

    Attributes:
        num_classes: size of the output layer.
        width: channels of the first conv (later ones use 2x).
    """

    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        norm = lambda name: BatchNorm(use_running_average=not train, name=name)
        x = nn.relu(norm("bn1")(nn.Conv(self.width, (3, 3), use_bias=False, name="conv1")(x)))
        x = nn.relu(norm("bn2")(nn.Conv(2 * self.width, (3, 3), use_bias=False, name="conv2")(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(norm("bn3")(nn.Conv(2 * self.width, (3, 3), use_bias=False, name="conv3")(x)))
        features = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", FEATURES, features)
        return nn.Dense(self.num_classes, name="head")(features)
