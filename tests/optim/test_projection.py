"""project_box keeps params + updates inside per-leaf bounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.errors import InvalidInputError
from fippure.optim import clip_to_box, project_box

pytestmark = pytest.mark.usefixtures("x64")


def tree(seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "a": {"m": jax.random.normal(keys[0], (5,), jnp.float64)},
        "b": jax.random.normal(keys[1], (2, 3), jnp.float64),
    }


def test_scalar_bounds_clip_the_next_params():
    params = jax.tree_util.tree_map(lambda x: jnp.clip(x, -0.5, 0.5), tree(0))
    updates = jax.tree_util.tree_map(lambda x: 3.0 * x, tree(1))
    tx = project_box(-0.5, 0.5)
    projected, _ = tx.update(updates, tx.init(params), params)
    new = optax.apply_updates(params, projected)
    expected = jax.tree_util.tree_map(lambda p, u: np.clip(p + u, -0.5, 0.5), params, updates)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-15), new, expected)
    # Updates that stay inside the box are left alone.
    small = jax.tree_util.tree_map(lambda x: 0.0 * x, updates)
    same, _ = tx.update(small, tx.init(params), params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, small)


def test_per_leaf_bounds_and_chain_under_jit():
    params = jax.tree_util.tree_map(jnp.ones_like, tree(2))
    lower = {"a": {"m": 0.25}, "b": jnp.full((2, 3), -1.0).at[0].set(0.9)}
    tx = optax.chain(optax.sgd(1.0), project_box(lower, 1.0))
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for seed in range(4):
        updates, state = step(params, state, tree(10 + seed))
        params = optax.apply_updates(params, updates)
    assert np.all(params["a"]["m"] >= 0.25 - 1e-12) and np.all(params["a"]["m"] <= 1 + 1e-12)
    assert np.all(params["b"][0] >= 0.9 - 1e-12) and np.all(params["b"][1] >= -1 - 1e-12)
    assert np.all(params["b"] <= 1 + 1e-12)
    clipped = clip_to_box(tree(5), lower, 1.0)
    assert np.all(clipped["b"][0] >= 0.9) and np.all(clipped["a"]["m"] >= 0.25)


def test_inside_optax_masked_frozen_leaves_pass_through():
    params = tree(3)
    updates = jax.tree_util.tree_map(lambda x: 10.0 * x, tree(4))
    tx = optax.masked(project_box(-1.0, 1.0), {"a": {"m": True}, "b": False})
    projected, _ = tx.update(updates, tx.init(params), params)
    np.testing.assert_array_equal(projected["b"], updates["b"])
    assert np.all(np.abs(params["a"]["m"] + projected["a"]["m"]) <= 1 + 1e-12)


def test_a_bound_that_would_reshape_a_parameter_is_refused():
    params = tree(6)
    column = {"a": {"m": jnp.zeros((5, 1))}, "b": 0.0}
    with pytest.raises(InvalidInputError, match=r"lower\['a'\]\['m'\] has shape \(5, 1\)"):
        project_box(column, 1.0).init(params)
    with pytest.raises(InvalidInputError, match="upper must have the pytree structure"):
        clip_to_box(params, 0.0, {"a": 1.0})


def test_bounds_follow_inject_hyperparams():
    # an annealed floor: the bounds of each update are used, not those of init
    params = {"m": jnp.ones(3)}
    pull_down = {"m": jnp.full(3, 10.0)}
    floor = optax.linear_schedule(0.9, 0.1, 4)
    tx = optax.chain(optax.sgd(1.0), optax.inject_hyperparams(project_box)(floor, 1.0))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(pull_down, s, p))
    for t in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["m"], float(floor(t)), rtol=1e-6)
    # a value written into the state's hyperparams takes effect at the next update
    tx = optax.inject_hyperparams(project_box)(lower=0.5, upper=1.0)
    state = tx.init({"m": jnp.ones(3)})
    state.hyperparams["lower"] = jnp.asarray(0.0)
    updates, _ = tx.update({"m": -jnp.ones(3)}, state, {"m": jnp.ones(3)})
    np.testing.assert_allclose(updates["m"], -1.0)


def test_optax_tree_utils_find_and_set_the_injected_bounds():
    """tree_get/tree_set name a hyper-parameter by its key; the state's own fields must not
    share the arguments' names, or the lookup is ambiguous and tree_set reshapes the state."""
    params = {"m": jnp.array([0.5, 2.0])}
    tx = optax.chain(optax.sgd(1.0), optax.inject_hyperparams(project_box)(lower=0.0, upper=1.0))
    state = tx.init(params)
    assert float(optax.tree_utils.tree_get(state, "upper")) == 1.0
    lowered = optax.tree_utils.tree_set(state, upper=jnp.asarray(0.8))
    assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(state)
    updates, _ = jax.jit(tx.update)({"m": jnp.zeros(2)}, lowered, params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["m"], [0.5, 0.8])


CROSSED = [
    (0.9, 0.1),
    ({"m": jnp.array([0.0, 0.95, 0.0])}, 0.9),
    (float("nan"), 1.0),  # every parameter would become NaN
    (0.0, {"m": jnp.array([1.0, jnp.nan, 1.0])}),
]


@pytest.mark.parametrize("lower, upper", CROSSED, ids=["scalar", "tree", "nan", "nan_leaf"])
def test_crossed_or_nan_bounds_are_refused(lower, upper):
    with pytest.raises(InvalidInputError, match="lower <= upper"):
        project_box(lower, upper).init({"m": jnp.ones(3)})
    with pytest.raises(InvalidInputError, match="clip_to_box needs bounds with lower <= upper"):
        clip_to_box({"m": jnp.ones(3)}, lower, upper)
