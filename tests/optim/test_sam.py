"""Adaptive SAM: the perturbation formula, the optax wrapper and the gradient helper agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.errors import InvalidInputError
from fippure.optim import adaptive_sam, asam_gradient, asam_perturbation

pytestmark = pytest.mark.usefixtures("x64")

RHO, ETA, LR = 0.3, 0.01, 0.1


def setup(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(keys[0], (4, 3), jnp.float64),
        "b": jax.random.normal(keys[1], (3,), jnp.float64),
    }
    x = jax.random.normal(keys[2], (8, 4), jnp.float64)

    def loss(p, x):
        return jnp.mean(jnp.sin(x @ p["w"] + p["b"]) ** 2) + 0.1 * jnp.sum(p["w"] ** 4)

    return params, x, loss


def reference_asam_gradient(params, x, loss, adaptive=True):
    grads = jax.grad(loss)(params, x)
    t = jax.tree_util.tree_map(
        (lambda p: np.abs(np.asarray(p)) + ETA) if adaptive else np.ones_like, params
    )
    tg = jax.tree_util.tree_map(lambda a, g: a * np.asarray(g), t, grads)
    norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree_util.tree_leaves(tg)))
    eps = jax.tree_util.tree_map(lambda a, v: RHO * a * v / norm, t, tg)
    perturbed = jax.tree_util.tree_map(lambda p, e: p + e, params, eps)
    return eps, jax.grad(loss)(perturbed, x)


@pytest.mark.parametrize("adaptive", [True, False])
def test_perturbation_and_gradient_helper(adaptive):
    params, x, loss = setup()
    eps_expected, grads_expected = reference_asam_gradient(params, x, loss, adaptive)
    eps = asam_perturbation(jax.grad(loss)(params, x), params, RHO, ETA, adaptive)
    jax.tree_util.tree_map(np.testing.assert_allclose, eps, eps_expected)
    value, grads = asam_gradient(loss, params, x, rho=RHO, eta=ETA, adaptive=adaptive)
    np.testing.assert_allclose(value, loss(params, x))
    jax.tree_util.tree_map(np.testing.assert_allclose, grads, grads_expected)
    # The neighbourhood is a genuine ascent step: the loss rises at theta + eps.
    assert loss(jax.tree_util.tree_map(jnp.add, params, eps), x) > loss(params, x)


def test_adaptive_sam_step_is_sgd_on_the_asam_gradient():
    params, x, loss = setup(1)
    _, grads_expected = reference_asam_gradient(params, x, loss)
    tx = adaptive_sam(optax.sgd(LR), rho=RHO, eta=ETA)
    grad_fn = lambda p, _: jax.grad(loss)(p, x)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
        jax.grad(loss)(params, x), tx.init(params), params
    )
    jax.tree_util.tree_map(
        lambda u, g: np.testing.assert_allclose(u, -LR * g, rtol=1e-12), updates, grads_expected
    )


def test_plain_sam_matches_optax_contrib_sam():
    params, x, loss = setup(2)
    grad_fn = lambda p, _: jax.grad(loss)(p, x)
    grads = jax.grad(loss)(params, x)
    ours = adaptive_sam(optax.sgd(LR), rho=RHO, adaptive=False)
    theirs = optax.contrib.sam(
        optax.sgd(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True
    )
    a, _ = ours.update(grads, ours.init(params), params, grad_fn=grad_fn)
    b, _ = theirs.update(grads, theirs.init(params), params, grad_fn=grad_fn)
    jax.tree_util.tree_map(np.testing.assert_allclose, a, b)


def test_a_negative_radius_or_a_missing_grad_fn_is_refused():
    with pytest.raises(InvalidInputError, match="rho must be >= 0"):
        adaptive_sam(optax.sgd(0.1), rho=-1.0)
    with pytest.raises(InvalidInputError, match="eta must be >= 0"):
        asam_gradient(lambda p: jnp.sum(p**2), jnp.ones(3), eta=-0.1)
    tx = adaptive_sam(optax.sgd(0.1))
    params = jnp.ones(3)
    with pytest.raises(InvalidInputError, match="adaptive_sam needs the extra grad_fn="):
        tx.update(params, tx.init(params), params)


def test_extras_other_than_grad_fn_reach_the_outer_optimizer():
    """ASAM around a natural-gradient optimiser: the Fisher-vector product passed to the
    update must reach natural_gradient (optax.contrib.sam forwards no extras)."""
    from fippure.optim import natural_gradient

    params, x, loss = setup(3)
    inner = optax.chain(natural_gradient(0.5), optax.sgd(LR))
    tx = adaptive_sam(inner, rho=RHO, eta=ETA)
    grads = jax.grad(loss)(params, x)
    twice = lambda v: jax.tree_util.tree_map(lambda a: 2.0 * a, v)  # noqa: E731
    updates, _ = jax.jit(
        lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q, _: jax.grad(loss)(q, x), fvp_fn=twice)
    )(grads, tx.init(params), params)
    _, sharp = reference_asam_gradient(params, x, loss)
    # (F + 0.5 I)^-1 g with F = 2 I
    expected = jax.tree_util.tree_map(lambda g: -LR * g / 2.5, sharp)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, expected
    )


def test_bad_optimizers_eta_and_gradients_are_refused_in_one_line():
    from fippure.optim import normalize_adaptive

    with pytest.raises(InvalidInputError, match="adaptive_sam wraps an optax optimizer"):
        adaptive_sam(0.1)
    with pytest.raises(InvalidInputError, match="eta must be >= 0"):
        normalize_adaptive(eta=-1.0)
    params, x, loss = setup()
    tx = adaptive_sam(optax.sgd(LR))
    with pytest.raises(InvalidInputError, match="adaptive_sam.*grad_fn's gradients"):
        tx.update(params, tx.init(params), params, grad_fn=lambda q, _: {"other": jnp.ones(1)})


def test_missing_params_or_a_masked_subset_are_refused_in_one_line():
    # these ended as "normalize_adaptive needs params" and as a TypeError about adding a
    # LinearizeTracer and a MaskedNode deep inside optax.contrib.sam
    params, x, loss = setup(3)
    grad_fn = lambda p, _: jax.grad(loss)(p, x)
    tx = adaptive_sam(optax.sgd(LR))
    with pytest.raises(InvalidInputError, match=r"adaptive_sam needs params .*grad_fn=\.\.\.\)"):
        tx.update(params, tx.init(params), None, grad_fn=grad_fn)
    partial = optax.multi_transform({"sam": tx, "frozen": optax.set_to_zero()},
                                    {"w": "sam", "b": "frozen"})  # fmt: skip
    with pytest.raises(InvalidInputError, match="adaptive_sam cannot run inside optax.masked"):
        partial.update(params, partial.init(params), params, grad_fn=grad_fn)


def test_the_transparent_mode_works_inside_optax_masked():
    # it calls no grad_fn, so the frozen leaves' placeholders never reach user code; refusing
    # them (as the opaque mode must) broke what worked
    params, x, loss = setup(4)
    grads = jax.grad(loss)(params, x)
    tx = adaptive_sam(optax.sgd(LR), rho=RHO, eta=ETA, opaque_mode=False)
    masked = optax.masked(tx, {"w": True, "b": False})
    updates, _ = masked.update(grads, masked.init(params), params)
    head_only, _ = tx.update({"w": grads["w"]}, tx.init({"w": params["w"]}), {"w": params["w"]})
    np.testing.assert_allclose(updates["w"], head_only["w"])
    np.testing.assert_allclose(updates["b"], grads["b"])  # masked out: passed through


def test_derivatives_through_the_perturbation_are_finite_at_a_zero_gradient():
    # the norm's guard once kept the value but not the derivative: sqrt'(0) made them NaN
    params = {"w": jnp.zeros(3)}

    def loss(q):
        return jnp.sum(q["w"] ** 2)  # its gradient vanishes at 0

    def perturbation_sum(q):
        return jnp.sum(asam_perturbation(jax.grad(loss)(q), q, 0.5)["w"])

    def asam_gradient_sum(q):
        return jnp.sum(asam_gradient(loss, q, rho=0.5)[1]["w"])

    assert np.all(asam_perturbation(jax.grad(loss)(params), params, 0.5)["w"] == 0)
    for function in (perturbation_sum, asam_gradient_sum):
        assert np.all(np.isfinite(jax.grad(function)(params)["w"]))
    # where g = 0 the guard divides by 1, so eps = rho T^2 g there and its derivative is
    # rho T^2 H: here T = eta (theta = 0) and H = 2 I
    np.testing.assert_allclose(jax.grad(perturbation_sum)(params)["w"], 0.5 * 0.01**2 * 2)
