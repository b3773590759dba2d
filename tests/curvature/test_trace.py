"""Hutchinson estimators against dense traces and diagonals (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.curvature import fisher, products, trace
from fippure.curvature.probes import rademacher_like
from fippure.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("x64")


def operators(problem):
    return {
        "hessian": products.make_hvp_operator(problem.loss_fn, problem.params, problem.batch),
        "ggn": products.make_ggn_operator(problem.logits_fn, problem.params, problem.batch),
        "empirical_fisher": products.make_empirical_fisher_operator(
            problem.per_example_loss_fn, problem.params, problem.batch
        ),
    }


def hutchinson_standard_error(matrix, num_probes):
    """Exact standard error of the Rademacher estimator: Var = 2 sum_{i != j} A_ij^2."""
    off = matrix - np.diag(np.diag(matrix))
    return np.sqrt(2 * np.sum(off**2) / num_probes)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_hutchinson_samples_are_exact_quadratic_forms(problem, dense, kind):
    key = jax.random.key(3)
    samples = jax.jit(
        lambda p, k: trace.hutchinson_samples(operators(problem)[kind], p, k, num_probes=4)
    )(problem.params, key)
    matrix = getattr(dense, kind)
    for i, probe_key in enumerate(jax.random.split(key, 4)):
        v = dense.flatten(rademacher_like(probe_key, problem.params))
        np.testing.assert_allclose(samples[i], v @ matrix @ v, rtol=1e-9)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_hutchinson_trace_converges_to_dense_trace(problem, dense, kind):
    num_probes = 2000
    estimate = jax.jit(
        lambda p, k: trace.hutchinson_trace(
            operators(problem)[kind], p, k, num_probes, vmap_probes=True
        )
    )(problem.params, jax.random.key(0))
    matrix = getattr(dense, kind)
    error = hutchinson_standard_error(matrix, num_probes)
    assert abs(float(estimate) - np.trace(matrix)) <= 4 * error
    assert error < 0.2 * abs(np.trace(matrix))  # power: a factor-2 bug is >= 5 errors off


def test_hutchinson_diagonal_converges(problem, dense):
    num_probes = 4000
    matrix = dense.ggn
    estimate = jax.jit(
        lambda p, k: trace.hutchinson_diagonal(
            operators(problem)["ggn"], p, k, num_probes, vmap_probes=True
        )
    )(problem.params, jax.random.key(1))
    assert jax.tree_util.tree_structure(estimate) == jax.tree_util.tree_structure(problem.params)
    # Var of v_i (A v)_i is sum_{j != i} A_ij^2.
    off = matrix - np.diag(np.diag(matrix))
    error = np.sqrt(np.sum(off**2, axis=1) / num_probes)
    np.testing.assert_array_less(
        np.abs(dense.flatten(estimate) - np.diag(matrix)), 5 * error + 1e-12
    )


def test_ggn_trace_needs_only_jvps_and_matches_the_operator(problem, dense):
    key = jax.random.key(7)
    jvp_only = jax.jit(
        lambda p, k: trace.ggn_trace_samples(problem.logits_fn, p, problem.batch, k, 5)
    )(problem.params, key)
    with_operator = jax.jit(
        lambda p, k: trace.hutchinson_samples(operators(problem)["ggn"], p, k, 5)
    )(problem.params, key)
    np.testing.assert_allclose(jvp_only, with_operator, rtol=1e-9)
    estimate = jax.jit(
        lambda p, k: trace.ggn_trace(problem.logits_fn, p, problem.batch, k, 2000, vmap_probes=True)
    )(problem.params, jax.random.key(8))
    assert abs(float(estimate) - np.trace(dense.ggn)) <= 4 * hutchinson_standard_error(
        dense.ggn, 2000
    )


def test_empirical_fisher_trace_per_probe_is_exact(problem, dense):
    key = jax.random.key(11)
    estimate = jax.jit(
        lambda p, k: fisher.empirical_fisher_trace(
            problem.per_example_loss_fn, p, problem.batch, k, 3
        )
    )(problem.params, key)
    probes = jax.vmap(lambda k: rademacher_like(k, problem.params))(jax.random.split(key, 3))
    expected = np.mean(
        [
            dense.flatten(jax.tree_util.tree_map(lambda x, i=i: x[i], probes))
            @ dense.empirical_fisher
            @ dense.flatten(jax.tree_util.tree_map(lambda x, i=i: x[i], probes))
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(estimate, expected, rtol=1e-9)


@pytest.mark.parametrize("margin", [16.0, 20.0, 24.0])
def test_ggn_trace_keeps_float32_precision_at_confident_predictions(margin):
    """``sum p u^2 - (sum p u)^2`` lost the per-example variance to cancellation in float32
    (0 instead of 1.1e-8 once 1 - max p was 4e-9); the centred form keeps it."""
    w = np.array([[margin, 0.0, 0.5], [0.3, -0.2, 0.1]])
    x = np.array([[1.0, 1.0], [1.0, -1.0]])
    logits_fn = lambda p, b: b @ p["w"]  # noqa: E731
    key = jax.random.key(3)
    exact = trace.ggn_trace_samples(logits_fn, {"w": jnp.asarray(w)}, jnp.asarray(x), key, 3)
    low = {"w": jnp.asarray(w, jnp.float32)}
    got = trace.ggn_trace_samples(logits_fn, low, jnp.asarray(x, jnp.float32), key, 3)
    assert got.dtype == jnp.float32 and float(exact.max()) < 1e-5
    np.testing.assert_allclose(got, exact, rtol=1e-4)


def test_true_fisher_trace_is_unbiased_for_the_ggn_trace(problem, dense):
    num_probes = 4000
    estimate = jax.jit(
        lambda p, k: fisher.true_fisher_trace(
            problem.logits_fn, p, problem.batch, k, num_probes, vmap_probes=True
        )
    )(problem.params, jax.random.key(5))
    # Sampling labels adds variance on top of the probes; bound it empirically from the
    # per-probe values of the same estimator.
    per_probe = jax.jit(
        jax.vmap(
            lambda k: fisher.true_fisher_trace(
                problem.logits_fn, problem.params, problem.batch, k, 1
            )
        )
    )(jax.random.split(jax.random.key(6), 500))
    error = np.std(per_probe) / np.sqrt(num_probes)
    assert abs(float(estimate) - np.trace(dense.ggn)) <= 5 * error
    assert error < 0.1 * np.trace(dense.ggn)


def test_looped_and_vmapped_probes_agree(problem):
    key = jax.random.key(12)
    for fn in (
        lambda p, v: fisher.empirical_fisher_trace(
            problem.per_example_loss_fn, p, problem.batch, key, 3, vmap_probes=v
        ),
        lambda p, v: fisher.true_fisher_trace(
            problem.logits_fn, p, problem.batch, key, 3, vmap_probes=v
        ),
        lambda p, v: trace.ggn_trace_samples(
            problem.logits_fn, p, problem.batch, key, 3, vmap_probes=v
        ),
        lambda p, v: trace.hutchinson_samples(
            operators(problem)["hessian"], p, key, 3, vmap_probes=v
        ),
    ):
        looped = jax.jit(lambda p, fn=fn: fn(p, False))(problem.params)
        vmapped = jax.jit(lambda p, fn=fn: fn(p, True))(problem.params)
        np.testing.assert_allclose(looped, vmapped, rtol=1e-10)


ESTIMATORS = {
    "hutchinson_trace": lambda pr, n, v: trace.hutchinson_trace(
        operators(pr)["hessian"], pr.params, jax.random.key(0), n, vmap_probes=v
    ),
    "hutchinson_samples": lambda pr, n, v: trace.hutchinson_samples(
        operators(pr)["hessian"], pr.params, jax.random.key(0), n, vmap_probes=v
    ),
    "hutchinson_diagonal": lambda pr, n, v: trace.hutchinson_diagonal(
        operators(pr)["hessian"], pr.params, jax.random.key(0), n, vmap_probes=v
    ),
    "ggn_trace": lambda pr, n, v: trace.ggn_trace(
        pr.logits_fn, pr.params, pr.batch, jax.random.key(0), n, vmap_probes=v
    ),
    "empirical_fisher_trace": lambda pr, n, v: fisher.empirical_fisher_trace(
        pr.per_example_loss_fn, pr.params, pr.batch, jax.random.key(0), n, vmap_probes=v
    ),
    "true_fisher_trace": lambda pr, n, v: fisher.true_fisher_trace(
        pr.logits_fn, pr.params, pr.batch, jax.random.key(0), n, vmap_probes=v
    ),
}


@pytest.mark.parametrize("vmap_probes", [False, True])
@pytest.mark.parametrize("num_probes", [0, -1])
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_non_positive_num_probes_is_a_one_line_error(problem, estimator, num_probes, vmap_probes):
    with pytest.raises(InvalidInputError, match=f"num_probes must be positive, got {num_probes}"):
        ESTIMATORS[estimator](problem, num_probes, vmap_probes)


def test_hutchinson_takes_shape_dtype_structs_as_like(problem):
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), problem.params
    )
    op = operators(problem)["hessian"]
    np.testing.assert_array_equal(
        trace.hutchinson_samples(op, shapes, jax.random.key(2), 3),
        trace.hutchinson_samples(op, problem.params, jax.random.key(2), 3),
    )


def test_probes_are_rademacher_signs_in_each_leafs_dtype():
    """Hutchinson with +-1 probes (SPEC section 8): the estimator's variance is the smallest of
    the unbiased ones, and a probe's squared norm is exactly the parameter count."""
    tree = {"w": jnp.zeros((64, 32), jnp.float32), "b": jnp.zeros((32,), jnp.bfloat16)}
    probe = rademacher_like(jax.random.key(0), tree)
    for name, leaf in tree.items():
        assert probe[name].dtype == leaf.dtype and probe[name].shape == leaf.shape
        values = np.unique(np.asarray(probe[name], np.float32))
        np.testing.assert_array_equal(values, [-1.0, 1.0])
