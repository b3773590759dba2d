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
from fippure.models.layers import FEATURES, ComputeDtype, as_output, compute_dtype


class EncoderBlock(nn.Module):
    """Pre-LN self-attention and MLP, each with a residual connection."""

    num_heads: int
    mlp_dim: int
    dtype: ComputeDtype | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        dtype = compute_dtype(self.dtype)
        y = nn.LayerNorm(dtype=dtype, name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=dtype, name="attention"
        )(y, y)
        y = nn.LayerNorm(dtype=dtype, name="ln2")(x)
        y = nn.Dense(self.mlp_dim, dtype=dtype, name="mlp_in")(y)
        y = nn.Dense(x.shape[-1], dtype=dtype, name="mlp_out")(nn.gelu(y))
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
        dtype: computation dtype of activations and of the conv/matmul arithmetic
            (``"bfloat16"`` or ``"float16"`` for mixed precision). Parameters stay float32
            and logits are returned in float32. ``None`` (default) follows the inputs and
            parameters.
    """

    num_classes: int = 10
    width: int = 192
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 4
    mlp_ratio: int = 2
    dtype: ComputeDtype | None = None

    def __post_init__(self):
        if self.width % self.num_heads:
            raise InvalidInputError(
                f"vit width {self.width} is not divisible by num_heads {self.num_heads}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no BatchNorm and no dropout
        dtype = compute_dtype(self.dtype)
        patch = min(self.patch_size, x.shape[1])
        if x.shape[1] % patch or x.shape[2] % patch:  # the patch embedding would zero-pad
            raise InvalidInputError(
                f"vit patch_size {patch} does not divide the {x.shape[1]}x{x.shape[2]} images"
            )
        x = nn.Conv(self.width, (patch, patch), (patch, patch), dtype=dtype, name="patch_embed")(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, h * w + 1, d))
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_ratio * self.width, self.dtype, name=f"block{i + 1}"
            )(x)
        features = as_output(nn.LayerNorm(dtype=dtype, name="ln_final")(x)[:, 0], dtype)
        self.sow("intermediates", FEATURES, features)
        return as_output(nn.Dense(self.num_classes, dtype=dtype, name="head")(features), dtype)
