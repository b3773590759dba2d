"""Trace estimators on float16 and bfloat16 parameters square and sum in at least float32, as
tree_dot, Lanczos and power iteration do: a float16 square overflows past 256."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.curvature import (
    empirical_fisher_trace,
    ggn_trace,
    per_example_fisher_trace,
    true_fisher_trace,
)

# logits x @ W with inputs of size 100: a Rademacher probe's jvp, x @ V, is a few hundred
_X = jnp.asarray(np.random.default_rng(0).normal(0.0, 100.0, (12, 16)))
_Y = jnp.arange(12) % 4
_W = jnp.asarray(np.random.default_rng(1).normal(0.0, 0.002, (16, 4)))


def _logits(params, x):
    return x @ params["w"]


def _per_example_loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y)


ESTIMATORS = {
    "ggn_trace": lambda p, x, y, k: ggn_trace(_logits, p, x, k, 4),
    "empirical_fisher_trace": lambda p, x, y, k: empirical_fisher_trace(
        _per_example_loss, p, (x, y), k, 4
    ),
    "true_fisher_trace": lambda p, x, y, k: true_fisher_trace(_logits, p, x, k, 64),
    "per_example_fisher_trace": lambda p, x, y, k: per_example_fisher_trace(
        _per_example_loss, p, (x, y)
    ),
}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_trace_of_low_precision_parameters_is_finite_and_float32(name, dtype):
    """ggn_trace had returned inf for float16 parameters (and analyze_curvature a NaN
    trace_ggn), the Fisher traces inf or bfloat16 scalars."""
    estimate = ESTIMATORS[name]
    key = jax.random.key(0)
    reference = estimate({"w": _W.astype(jnp.float32)}, _X.astype(jnp.float32), _Y, key)
    low = estimate({"w": _W.astype(dtype)}, _X.astype(dtype), _Y, key)
    assert low.dtype == jnp.float32
    assert np.isfinite(float(low))
    assert float(low) == pytest.approx(float(reference), rel=0.1)
