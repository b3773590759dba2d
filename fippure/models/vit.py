"""A small Vision Transformer (Dosovitskiy et al., 2021) for 32x32 images.

Patch embedding by a strided convolution, a class token, learned position embeddings,
pre-LayerNorm encoder blocks and a dense ``head`` on the class token. No BatchNorm, so its
``batch_stats`` collection is empty; no dropout, so ``apply`` needs no rng.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.errors import InvalidInputError
from fippure.models.layers import FEATURES


class EncoderBlock(nn.Module):
    """Pre-LN self-attention and MLP, each with a residual connection."""

    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.mlp_dim, name="mlp_in")(y)
        y = nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))
        return x + y


class ViT(nn.Module):
    """ViT with ``depth`` blocks of width ``width``.

    Attributes:
        num_classes: size of the output layer.
        width: embedding dimension.
        depth: number of encoder blocks.
        num_heads: attention heads.
        patch_size: side of a square patch.
        mlp_ratio: MLP hidden size over ``width``.
    """

    num_classes: int = 10
    width: int = 192
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 4
    mlp_ratio: int = 2

    def __post_init__(self):
        if self.width % self.num_heads:
            raise InvalidInputError(
                f"vit width {self.width} is not divisible by num_heads {self.num_heads}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no BatchNorm and no dropout
        patch = min(self.patch_size, x.shape[1])
        x = nn.Conv(self.width, (patch, patch), (patch, patch), name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d))
        x = x + pos
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_ratio * self.width, name=f"block{i + 1}")(x)
        features = nn.LayerNorm(name="ln_final")(x)[:, 0]
        self.sow("intermediates", FEATURES, features)
        return nn.Dense(self.num_classes, name="head")(features)
