"""Classification losses shared by training and the defenses."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def cross_entropy(
    logits: Float[Array, "b k"], labels: Int[Array, " b"], label_smoothing: float = 0.0
) -> Float[Array, ""]:
    """Mean softmax cross-entropy, optionally with label smoothing."""
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(
        jnp.eye(logits.shape[-1], dtype=logits.dtype)[labels], label_smoothing
    )
    return optax.softmax_cross_entropy(logits, targets).mean()


def soft_cross_entropy(
    logits: Float[Array, "b k"], targets: Float[Array, "b k"]
) -> Float[Array, ""]:
    """Mean cross-entropy against soft targets (MixUp)."""
    return optax.softmax_cross_entropy(logits, targets).mean()
