"""Tiny float64 problems with dense curvature matrices (the kfac-jax testing pattern).

``problem`` is parametrised over a two-layer tanh MLP and a small convnet with BatchNorm in
eval mode. ``dense`` materialises the Hessian, GGN, true Fisher and empirical Fisher of the
current problem from Jacobians over the flattened parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree


@pytest.fixture(scope="module")
def x64():
    """float64 (and quick compiles) for a whole test module; restores the previous settings."""
    previous = jax.config.read("jax_enable_x64")
    optimizations = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time rules
    yield
    jax.config.update("jax_enable_x64", previous)
    jax.config.update("jax_disable_most_optimizations", optimizations)


class Problem(NamedTuple):
    name: str
    params: Any
    batch: tuple[jax.Array, jax.Array]  # (inputs, labels)
    logits_fn: Callable  # (params, batch) -> (n, K)

    def per_example_loss_fn(self, params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(
            self.logits_fn(params, batch), batch[1]
        )

    def loss_fn(self, params, batch):
        return jnp.mean(self.per_example_loss_fn(params, batch))


class TinyCNN(nn.Module):
    """conv3x3 -> BatchNorm (running statistics unless ``train``) -> tanh -> mean pool -> dense."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = jnp.tanh(x).mean(axis=(1, 2))
        return nn.Dense(3, name="head")(x)


def mlp_problem(key=0, n=6, d=4, hidden=3, classes=3) -> Problem:
    k = jax.random.split(jax.random.key(key), 6)
    params = {
        "hidden": {
            "kernel": jax.random.normal(k[0], (d, hidden), jnp.float64),
            "bias": 0.1 * jax.random.normal(k[1], (hidden,), jnp.float64),
        },
        "head": {
            "kernel": jax.random.normal(k[2], (hidden, classes), jnp.float64),
            "bias": 0.1 * jax.random.normal(k[3], (classes,), jnp.float64),
        },
    }
    inputs = jax.random.normal(k[4], (n, d), jnp.float64)
    labels = jax.random.randint(k[5], (n,), 0, classes)

    def logits_fn(p, batch):
        h = jnp.tanh(batch[0] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    return Problem("mlp", params, (inputs, labels), logits_fn)


def tiny_bn_classifier(key=1, n=5) -> tuple[nn.Module, dict, jax.Array, jax.Array]:
    """``(TinyCNN(), variables, inputs, labels)`` in float64; the variables hold random batch
    statistics beside the parameters."""
    k = jax.random.split(jax.random.key(key), 5)
    model = TinyCNN()
    inputs = jax.random.normal(k[0], (n, 4, 4, 2), jnp.float64)
    variables = model.init(k[1], inputs)
    variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), variables)
    stats = {
        "bn": {
            "mean": 0.1 * jax.random.normal(k[2], (3,), jnp.float64),
            "var": 0.5 + jax.random.uniform(k[3], (3,), jnp.float64),
        }
    }
    labels = jax.random.randint(k[4], (n,), 0, 3)
    return model, {"params": variables["params"], "batch_stats": stats}, inputs, labels


def classifier_problem(name, model, variables, inputs, labels) -> Problem:
    """The eval-mode cross-entropy of a Flax classifier at ``variables`` as a :class:`Problem`."""

    def logits_fn(p, batch):
        return model.apply({**variables, "params": p}, batch[0])

    return Problem(name, variables["params"], (inputs, labels), logits_fn)


def cnn_problem(key=1, n=5) -> Problem:
    return classifier_problem("cnn", *tiny_bn_classifier(key, n))


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem}


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def problem(request, x64) -> Problem:
    return PROBLEMS[request.param]()


class Dense(NamedTuple):
    hessian: np.ndarray
    ggn: np.ndarray
    true_fisher: np.ndarray
    empirical_fisher: np.ndarray
    flatten: Callable  # pytree -> flat numpy vector
    unflatten: Callable  # flat vector -> pytree


def dense_matrices(problem: Problem) -> Dense:
    flat, unravel = ravel_pytree(problem.params)

    @jax.jit
    def matrices(flat, batch):
        logits_of = lambda f: problem.logits_fn(unravel(f), batch)
        hessian = jax.hessian(lambda f: problem.loss_fn(unravel(f), batch))(flat)
        logits = logits_of(flat)
        n = logits.shape[0]
        jac = jax.jacfwd(logits_of)(flat)  # (n, K, P)
        probs = jax.nn.softmax(logits)
        h_logit = jax.vmap(jnp.diag)(probs) - probs[:, :, None] * probs[:, None, :]
        ggn = jnp.einsum("ikp,ikl,ilq->pq", jac, h_logit, jac) / n
        # True Fisher: the exact expectation over y ~ p(.|x_i) of the score outer product.
        score = jax.jacfwd(lambda f: jax.nn.log_softmax(logits_of(f)))(flat)  # (n, K, P)
        true_fisher = jnp.einsum("ik,ikp,ikq->pq", probs, score, score) / n
        per_example = jax.jacfwd(lambda f: problem.per_example_loss_fn(unravel(f), batch))(flat)
        empirical = per_example.T @ per_example / n
        return hessian, ggn, true_fisher, empirical

    arrays = [np.asarray(a, np.float64) for a in matrices(flat, problem.batch)]
    return Dense(*arrays, lambda tree: np.asarray(ravel_pytree(tree)[0]), unravel)


@pytest.fixture(scope="module")
def dense(problem) -> Dense:
    return dense_matrices(problem)


@pytest.fixture(scope="module")
def bn_classifier(x64):
    """``(model, variables, inputs, labels)``: the convnet problem's classifier, whole."""
    return tiny_bn_classifier()


@pytest.fixture
def dense_classifier():
    """``(model, variables, inputs, labels) -> Dense``: the dense matrices of a classifier."""
    return lambda *classifier: dense_matrices(classifier_problem("classifier", *classifier))


def random_like(key, tree):
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(jax.random.key(key), flat.shape, flat.dtype))


@pytest.fixture
def random_tree() -> Callable:
    """``(seed, tree) -> `` a standard-normal pytree shaped like ``tree``."""
    return random_like
