"""Exact Fisher diagonal and the differentiable Fisher-trace penalties (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

from fippure.curvature import fisher, trace
from fippure.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("x64")


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_exact_fisher_diagonal_equals_dense_diagonal(problem, dense, chunk_size):
    # n = 5 or 6 examples: chunk 4 pads the last chunk, 64 covers everything in one.
    diagonal = fisher.empirical_fisher_diagonal(
        problem.per_example_loss_fn, problem.params, problem.batch, chunk_size=chunk_size
    )
    assert jax.tree_util.tree_structure(diagonal) == jax.tree_util.tree_structure(problem.params)
    np.testing.assert_allclose(
        dense.flatten(diagonal), np.diag(dense.empirical_fisher), rtol=1e-9, atol=1e-14
    )


def test_fisher_diagonal_rejects_ragged_batches(problem):
    inputs, labels = problem.batch
    with pytest.raises(InvalidInputError, match="leading size"):
        fisher.empirical_fisher_diagonal(
            problem.per_example_loss_fn, problem.params, (inputs, labels[:-1])
        )


@pytest.mark.parametrize("estimator", ["empirical", "ggn"])
def test_trace_penalty_gradient_matches_finite_differences(problem, estimator):
    # (true_fisher_trace is left out on purpose: its gradient adds a score-function term for
    # the sampled labels, which finite differences at fixed labels cannot see; see below.)
    key = jax.random.key(4)
    fn = {
        "empirical": lambda p: fisher.empirical_fisher_trace(
            problem.per_example_loss_fn, p, problem.batch, key, 2
        ),
        "ggn": lambda p: trace.ggn_trace(problem.logits_fn, p, problem.batch, key, 2),
    }[estimator]
    check_grads(jax.jit(fn), (problem.params,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def _dense_ggn_trace(problem, params):
    """``Tr G = (1/n) sum_i tr(J_i^T (diag p_i - p_i p_i^T) J_i)`` from the dense Jacobian."""
    flat, unravel = ravel_pytree(params)
    logits_of = lambda f: problem.logits_fn(unravel(f), problem.batch)  # noqa: E731
    jac = jax.jacrev(logits_of)(flat)  # (n, K, P)
    probs = jax.nn.softmax(logits_of(flat), axis=-1)
    h = jax.vmap(jnp.diag)(probs) - probs[:, :, None] * probs[:, None, :]
    return jnp.einsum("ikp,ikl,ilp->", jac, h, jac) / probs.shape[0]


def test_true_fisher_trace_gradient_is_unbiased_for_the_true_fisher_trace_gradient(problem):
    # The labels are sampled from the model, so grad E_y[u_y^2] needs the score-function term;
    # without it (labels held fixed) the mean gradient was 81% off on a tiny model.
    exact_gradient = jax.jit(jax.grad(lambda p: _dense_ggn_trace(problem, p)))
    exact = ravel_pytree(exact_gradient(problem.params))[0]

    def mean_gradient(key):
        return ravel_pytree(
            jax.grad(
                lambda p: fisher.true_fisher_trace(
                    problem.logits_fn, p, problem.batch, key, 2000, vmap_probes=True
                )
            )(problem.params)
        )[0]

    keys = jax.random.split(jax.random.key(11), 10)
    estimate = jnp.mean(jax.lax.map(jax.jit(mean_gradient), keys), axis=0)
    assert np.linalg.norm(estimate - exact) < 0.15 * np.linalg.norm(exact)


def test_trace_penalty_gradient_is_unbiased(problem, dense):
    # Averaged over many probes, grad TrF_hat -> grad Tr F_emp = grad mean_i ||grad l_i||^2.
    exact = jax.jit(
        jax.grad(
            lambda p: sum(
                leaf.sum()
                for leaf in jax.tree_util.tree_leaves(
                    fisher.empirical_fisher_diagonal(problem.per_example_loss_fn, p, problem.batch)
                )
            )
        )
    )(problem.params)
    estimate = jax.jit(
        jax.grad(
            lambda p: fisher.empirical_fisher_trace(
                problem.per_example_loss_fn,
                p,
                problem.batch,
                jax.random.key(9),
                3000,
                vmap_probes=True,
            )
        )
    )(problem.params)
    exact, estimate = dense.flatten(exact), dense.flatten(estimate)
    assert np.linalg.norm(estimate - exact) < 0.1 * np.linalg.norm(exact)


def _dense_empirical_trace(problem, params):
    """``Tr F_emp = (1/n) ||J||_F^2`` from the dense Jacobian of the per-example losses."""
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda f: problem.per_example_loss_fn(unravel(f), problem.batch))(flat)
    return jnp.sum(jac**2) / jac.shape[0]


def test_per_example_fisher_trace_equals_the_dense_trace(problem, dense):
    value = fisher.per_example_fisher_trace(
        problem.per_example_loss_fn, problem.params, problem.batch
    )
    np.testing.assert_allclose(value, np.trace(dense.empirical_fisher), rtol=1e-10)


def test_per_example_fisher_trace_gradient_is_the_dense_traces_gradient(problem, dense):
    # the exact gradient, not an estimate: reverse over reverse through per-example gradients
    fn = lambda p: fisher.per_example_fisher_trace(  # noqa: E731
        problem.per_example_loss_fn, p, problem.batch
    )
    exact = jax.jit(jax.grad(lambda p: _dense_empirical_trace(problem, p)))(problem.params)
    np.testing.assert_allclose(
        dense.flatten(jax.jit(jax.grad(fn))(problem.params)), dense.flatten(exact), rtol=1e-9
    )
    check_grads(jax.jit(fn), (problem.params,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_per_example_fisher_trace_is_the_mean_of_the_hutchinson_estimates(problem):
    # E_v[(J v)_i^2] = ||grad l_i||^2: the probe estimate's mean is the exact trace
    exact = fisher.per_example_fisher_trace(
        problem.per_example_loss_fn, problem.params, problem.batch
    )
    estimate = fisher.empirical_fisher_trace(
        problem.per_example_loss_fn,
        problem.params,
        problem.batch,
        jax.random.key(3),
        4000,
        vmap_probes=True,
    )
    np.testing.assert_allclose(estimate, exact, rtol=0.05)


def test_per_example_fisher_trace_rejects_a_mean_loss(problem):
    with pytest.raises(InvalidInputError, match="one loss per example"):
        fisher.per_example_fisher_trace(
            lambda p, b: jnp.mean(problem.per_example_loss_fn(p, b)), problem.params, problem.batch
        )
