"""Batched, jitted prediction with a fixed batch shape (the last batch is padded)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fippure.data.catalog import DatasetSpec
from fippure.data.pipeline import normalize, to_unit_range
from fippure.models.registry import Variables


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _logits(model: nn.Module, spec: DatasetSpec, variables: Variables, images: jax.Array):
    return model.apply(variables, normalize(to_unit_range(images), spec), train=False)


def predict_logits(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> np.ndarray:
    """Eval-mode logits of ``images`` (uint8, or floats in [0, 1]), normalised with ``spec``.

    Returns:
        float32 ``(n, K)`` numpy array.
    """
    n = int(images.shape[0])
    batch_size = max(1, min(batch_size, n))
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        short = batch_size - chunk.shape[0]
        if short:
            chunk = jnp.concatenate(
                [jnp.asarray(chunk), jnp.repeat(jnp.asarray(chunk[-1:]), short, 0)]
            )
        out.append(_logits(model, spec, variables, chunk)[: batch_size - short])
    return np.asarray(jnp.concatenate(out))


def predict(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> np.ndarray:
    """Predicted labels (int32 numpy array) of ``images`` in eval mode."""
    return predict_logits(model, variables, images, spec, batch_size).argmax(-1).astype(np.int32)


def accuracy(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    labels: np.ndarray,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> float:
    """Fraction of ``images`` predicted as ``labels``."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(predict(model, variables, images, spec, batch_size) == np.asarray(labels)))
