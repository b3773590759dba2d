"""Building blocks shared by the models."""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array

#: BatchNorm as in PyTorch (momentum 0.1 there is 0.9 here; eps 1e-5).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

FEATURES = "features"
"""Name under which every model sows its penultimate features in ``intermediates``."""

#: The computation dtypes a classifier accepts as its ``dtype`` field.
ComputeDtype = Literal["float32", "bfloat16", "float16"]


def compute_dtype(name: str | None) -> Any:
    """The ``jnp`` dtype for a model's ``dtype`` field; ``None`` stays ``None``.

    ``None`` lets Flax infer each layer's dtype from its inputs and parameters (float32, or
    float64 under ``jax_enable_x64``, which the dense-matrix tests use).
    """
    return None if name is None else jnp.dtype(name)


def as_output(x: Array, dtype: Any) -> Array:
    """``x`` in float32 when the model computes in a reduced dtype, unchanged otherwise.

    Logits and sown features leave a reduced-precision model in float32, so losses, softmaxes,
    Fisher terms and metrics are computed in full precision (mixed precision as in Micikevicius
    et al., "Mixed Precision Training", ICLR 2018).
    """
    return x if dtype is None else x.astype(jnp.float32)
