"""fisher_anchor adds exactly strength * F * (theta - theta0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.errors import InvalidInputError
from fippure.optim import anchor_penalty, fisher_anchor

pytestmark = pytest.mark.usefixtures("x64")


def trees(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = {"dense": {"kernel": (3, 2), "bias": (2,)}, "scale": (4,)}
    leaves, treedef = jax.tree_util.tree_flatten(shape, is_leaf=lambda x: isinstance(x, tuple))

    def draw(key, positive=False):
        ks = jax.random.split(key, len(leaves))
        out = [jax.random.normal(k, s, jnp.float64) for k, s in zip(ks, leaves, strict=True)]
        out = [jnp.abs(x) if positive else x for x in out]
        return jax.tree_util.tree_unflatten(treedef, out)

    return draw(keys[0]), draw(keys[1]), draw(keys[2], positive=True), draw(keys[3])


def test_adds_exactly_the_anchor_term():
    grads, params, fisher, anchor = trees()
    tx = fisher_anchor(fisher, anchor, 0.7)
    updates, state = tx.update(grads, tx.init(params), params)
    expected = jax.tree_util.tree_map(
        lambda g, p, f, a: g + 0.7 * f * (p - a), grads, params, fisher, anchor
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, updates, expected)
    assert int(state.count) == 1


def test_schedule_strength_and_zero_at_the_anchor():
    grads, params, fisher, _ = trees(1)
    tx = fisher_anchor(fisher, params, lambda count: 2.0 * (count + 1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)  # params == anchor: nothing added
    jax.tree_util.tree_map(np.testing.assert_array_equal, updates, grads)
    moved = jax.tree_util.tree_map(lambda p: p + 1.0, params)
    updates, state = tx.update(grads, state, moved)  # strength 4.0 at count 1
    expected = jax.tree_util.tree_map(lambda g, f: g + 4.0 * f, grads, fisher)
    jax.tree_util.tree_map(np.testing.assert_allclose, updates, expected)


def test_inside_optax_masked_frozen_leaves_pass_through():
    grads, params, fisher, anchor = trees(2)
    mask = {"dense": {"kernel": True, "bias": False}, "scale": True}
    tx = optax.masked(fisher_anchor(fisher, anchor, 1.0), mask)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])
    np.testing.assert_allclose(
        updates["scale"],
        grads["scale"] + fisher["scale"] * (params["scale"] - anchor["scale"]),
    )


def test_needs_params():
    grads, params, fisher, anchor = trees(3)
    tx = fisher_anchor(fisher, anchor, 1.0)
    with pytest.raises(InvalidInputError, match="needs params"):
        tx.update(grads, tx.init(params))


def test_a_fisher_or_anchor_that_would_reshape_a_parameter_is_refused():
    grads, params, fisher, anchor = trees(4)
    column = {**fisher, "dense": {**fisher["dense"], "bias": fisher["dense"]["bias"][:, None]}}
    with pytest.raises(InvalidInputError, match=r"fisher_diag\['dense'\]\['bias'\] has shape"):
        fisher_anchor(column, anchor, 1.0).init(params)
    with pytest.raises(InvalidInputError, match=r"anchor_params must have the pytree structure"):
        fisher_anchor(fisher, anchor["dense"], 1.0).init(params)
    # A leaf that broadcasts without changing the parameter's shape is fine: one per layer.
    per_layer = jax.tree_util.tree_map(lambda f: jnp.mean(f), fisher)
    tx = fisher_anchor(per_layer, anchor, 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert jax.tree_util.tree_map(jnp.shape, updates) == jax.tree_util.tree_map(jnp.shape, grads)


def test_a_negative_strength_or_fisher_is_refused():
    _, _, fisher, anchor = trees(5)
    with pytest.raises(InvalidInputError, match="strength must be >= 0"):
        fisher_anchor(fisher, anchor, -1.0)
    negative = jax.tree_util.tree_map(lambda f: -f, fisher)
    with pytest.raises(InvalidInputError, match="negative entries"):
        fisher_anchor(negative, anchor, 1.0)


def test_updates_that_are_not_shaped_like_the_params_are_refused_in_one_line():
    params, grads, fisher, anchor = trees(6)
    transposed = {**grads, "dense": {**grads["dense"], "kernel": grads["dense"]["kernel"].T}}
    tx = fisher_anchor(fisher, anchor, 1.0)
    with pytest.raises(InvalidInputError, match="fisher_anchor.*updates"):
        tx.update(transposed, tx.init(params), params)


def test_a_schedule_that_turns_negative_is_refused_at_that_update():
    """A negative strength would push the parameters away from the anchor."""
    params, grads, fisher, anchor = trees(7)
    tx = fisher_anchor(fisher, anchor, optax.linear_schedule(1.0, -1.0, 2))
    state = tx.init(params)
    _, state = tx.update(grads, state, params)  # strength 1
    _, state = tx.update(grads, state, params)  # strength 0
    with pytest.raises(InvalidInputError, match="schedule gave -1.0 at step 2"):
        tx.update(grads, state, params)


def test_anchor_penalty_is_half_the_weighted_squared_distance_and_checks_its_trees():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    anchor = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([[1.0]])}
    fisher = {"a": jnp.array([2.0, 4.0]), "b": jnp.array([[0.5]])}
    value = anchor_penalty(3.0, fisher, params, anchor)
    np.testing.assert_allclose(value, 0.5 * 3.0 * (2.0 * 1 + 4.0 * 1 + 0.5 * 4))
    # its gradient is what fisher_anchor adds to the updates
    tx = fisher_anchor(fisher, anchor, 3.0)
    added, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    grad = jax.grad(lambda p: anchor_penalty(3.0, fisher, p, anchor))(params)
    jax.tree_util.tree_map(np.testing.assert_allclose, grad, added)
    # trees that do not fit: a raw zip() or broadcasting error before
    with pytest.raises(InvalidInputError, match="anchor_penalty: fisher_diag must have"):
        anchor_penalty(1.0, {"a": fisher["a"]}, params, anchor)
    with pytest.raises(InvalidInputError, match=r"anchor_penalty: anchor_params\['a'\]"):
        anchor_penalty(1.0, fisher, params, {"a": jnp.zeros((2, 2)), "b": anchor["b"]})
