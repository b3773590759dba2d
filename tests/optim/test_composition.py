"""Every transform works inside optax.chain under jax.jit, and its state survives orbax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.curvature import make_ggn_operator
from fippure.errors import InvalidInputError
from fippure.optim import (
    adaptive_sam,
    asam_gradient,
    fisher_anchor,
    natural_gradient,
    project_box,
)

pytestmark = pytest.mark.usefixtures("x64")


def head_problem(seed=0, n=12, d=3, k=3):
    keys = jax.random.split(jax.random.key(seed), 4)
    features = jax.random.normal(keys[0], (n, d), jnp.float64)
    labels = jax.random.randint(keys[1], (n,), 0, k)
    params = {
        "kernel": jax.random.normal(keys[2], (d, k), jnp.float64),
        "bias": 0.1 * jax.random.normal(keys[3], (k,), jnp.float64),
    }
    return params, features, labels


def logits_fn(params, features):
    return features @ params["kernel"] + params["bias"]


def loss_fn(params, features, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, features), labels
    ).mean()


def make(name, params):
    fisher = jax.tree_util.tree_map(lambda p: jnp.abs(p) + 0.1, params)
    return {
        "fisher_anchor": optax.chain(
            fisher_anchor(fisher, params, 0.5), optax.sgd(0.1, momentum=0.9)
        ),
        "natural_gradient_cg": optax.chain(
            optax.clip_by_global_norm(10.0), natural_gradient(1e-2, "cg"), optax.scale(-0.1)
        ),
        "natural_gradient_dense": optax.chain(
            optax.clip_by_global_norm(10.0),
            natural_gradient(1e-2, "dense", refresh_every=2),
            optax.scale(-0.1),
        ),
        "project_box": optax.chain(optax.sgd(0.5), project_box(-0.2, 0.3)),
        "adaptive_sam": adaptive_sam(optax.sgd(0.1, momentum=0.9), rho=0.5),
    }[name]


NAMES = [
    "fisher_anchor",
    "natural_gradient_cg",
    "natural_gradient_dense",
    "project_box",
    "adaptive_sam",
]


@pytest.mark.parametrize("name", NAMES)
def test_chain_under_jit_and_orbax_round_trip(name, round_trip):
    params, features, labels = head_problem()
    tx = make(name, params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params, features, labels)
        updates, state = tx.update(
            grads,
            state,
            params,
            fvp_fn=make_ggn_operator(logits_fn, params, features),
            features=features,
            logits=logits_fn(params, features),
            grad_fn=lambda p, _: jax.grad(loss_fn)(p, features, labels),
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    start = loss_fn(params, features, labels)
    for _ in range(3):
        params, state = step(params, state)
    assert np.isfinite(loss_fn(params, features, labels))
    if name != "project_box":
        assert loss_fn(params, features, labels) < start
    restored = round_trip(state)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
    # Resuming from the restored state gives the same next step.
    np.testing.assert_array_equal(
        jax.flatten_util.ravel_pytree(step(params, restored)[0])[0],
        jax.flatten_util.ravel_pytree(step(params, state)[0])[0],
    )


def _concrete_arguments_inside_jit():
    """Factories called inside a jitted step with concrete arrays from outside it (closed over,
    or injected by optax.inject_hyperparams): their checks once raised
    TracerBoolConversionError, since a JAX comparison inside a trace is traced."""
    params = {"w": jnp.ones(3)}
    fisher, anchor = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}

    def anchor_built_in_step(p):
        tx = fisher_anchor(fisher, anchor, 1.0)
        return tx.update(p, tx.init(p), p)[0]

    injected_anchor = optax.inject_hyperparams(fisher_anchor)(fisher, anchor, strength=0.5)
    injected_ng = optax.inject_hyperparams(natural_gradient)(1e-2, "cg", diagonal=fisher)
    rho = jnp.asarray(0.5)
    return params, {
        "fisher_anchor built in the step": anchor_built_in_step,
        "inject_hyperparams(fisher_anchor)": lambda p: injected_anchor.update(
            p, injected_anchor.init(p), p
        )[0],
        "inject_hyperparams(natural_gradient, diagonal=...)": lambda p: injected_ng.update(
            p, injected_ng.init(p), p, fvp_fn=lambda v: v
        )[0],
        "asam_gradient(rho=array)": lambda p: asam_gradient(
            lambda q: jnp.sum(q["w"] ** 2), p, rho=rho
        )[1],
    }


@pytest.mark.parametrize("case", list(_concrete_arguments_inside_jit()[1]))
def test_checked_arguments_may_be_concrete_arrays_inside_jit(case):
    params, steps = _concrete_arguments_inside_jit()
    eager = steps[case](params)
    jitted = jax.jit(steps[case])(params)
    jax.tree_util.tree_map(np.testing.assert_allclose, jitted, eager)


def test_a_negative_fisher_is_still_refused_inside_jit():
    negative = {"w": -jnp.ones(3)}
    with pytest.raises(InvalidInputError, match="negative entries"):
        jax.jit(lambda p: fisher_anchor(negative, p, 1.0).init(p))({"w": jnp.ones(3)})


def _count_host_copies(monkeypatch):
    """Counts the host copies ``has_negative_entries`` makes of its leaves."""
    import fippure.tree_checks as tree_checks

    copies = []
    real = tree_checks.np.asarray

    class CountingNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def asarray(x, *args, **kwargs):
            copies.append(x)
            return real(x, *args, **kwargs)

    monkeypatch.setattr(tree_checks, "np", CountingNumpy())
    return copies


def test_an_injected_fisher_is_copied_to_the_host_once_not_every_update(monkeypatch):
    """optax.inject_hyperparams calls the factory again at every update; the Fisher, an
    immutable jax.Array judged non-negative once, is not copied to the host again."""
    copies = _count_host_copies(monkeypatch)
    params = {"w": jnp.ones(3)}
    fisher = {"w": jnp.arange(3.0)}
    tx = optax.inject_hyperparams(fisher_anchor)(fisher, {"w": jnp.zeros(3)}, strength=0.5)
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(params, state, params)
    assert sum(x is fisher["w"] for x in copies) == 1


def test_a_numpy_fisher_is_judged_again_since_it_can_change():
    fisher = {"w": np.ones(3)}
    fisher_anchor(fisher, {"w": np.zeros(3)}, 1.0)
    fisher["w"][1] = -1.0
    with pytest.raises(InvalidInputError, match="negative entries"):
        fisher_anchor(fisher, {"w": np.zeros(3)}, 1.0)
