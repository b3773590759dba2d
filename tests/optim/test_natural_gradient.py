"""natural_gradient against the dense damped Newton step on a logistic regression."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fippure.curvature import make_ggn_operator
from fippure.errors import InvalidInputError
from fippure.optim import head_fisher, natural_gradient

pytestmark = pytest.mark.usefixtures("x64")

DAMPING = 1e-2


def problem(seed=0, n=20, d=4, k=3, bias=True):
    keys = jax.random.split(jax.random.key(seed), 4)
    features = jax.random.normal(keys[0], (n, d), jnp.float64)
    labels = jax.random.randint(keys[1], (n,), 0, k)
    params = {"kernel": jax.random.normal(keys[2], (d, k), jnp.float64)}
    if bias:
        params["bias"] = 0.1 * jax.random.normal(keys[3], (k,), jnp.float64)
    return params, features, labels


def logits_fn(params, features):
    return features @ params["kernel"] + params.get("bias", 0.0)


def loss_fn(params, features, labels):
    logits = logits_fn(params, features)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def damped_newton(params, features, labels):
    """(H + damping I)^-1 g from the dense Hessian: for softmax regression H = F exactly."""
    flat, unravel = ravel_pytree(params)
    objective = lambda f: loss_fn(unravel(f), features, labels)
    hessian = jax.hessian(objective)(flat)
    gradient = jax.grad(objective)(flat)
    return unravel(jnp.linalg.solve(hessian + DAMPING * jnp.eye(flat.size), gradient))


def test_head_fisher_is_the_hessian_in_kernel_bias_row_order():
    params, features, labels = problem()
    d, k = params["kernel"].shape

    def from_theta(theta):  # Theta = [kernel; bias], row-major: index j * K + k
        rows = theta.reshape(d + 1, k)
        return loss_fn({"kernel": rows[:d], "bias": rows[d]}, features, labels)

    theta = jnp.concatenate([params["kernel"], params["bias"][None]]).reshape(-1)
    hessian = jax.jit(jax.hessian(from_theta))(theta)  # one program, not one per operation
    fisher = head_fisher(features, logits_fn(params, features))
    np.testing.assert_allclose(fisher, hessian, rtol=1e-10, atol=1e-13)
    # SPEC's (diag(p) - pp^T) kron (h h^T) is the same matrix in class-major order.
    probs = jax.nn.softmax(logits_fn(params, features))
    h = jnp.concatenate([features, jnp.ones((features.shape[0], 1))], axis=1)
    per_example = jax.vmap(lambda p, x: jnp.kron(jnp.diag(p) - jnp.outer(p, p), jnp.outer(x, x)))
    spec_order = jnp.mean(jax.jit(per_example)(probs, h), axis=0)
    perm = np.arange((d + 1) * k).reshape(d + 1, k).T.reshape(-1)  # class-major -> ours
    np.testing.assert_allclose(
        fisher, spec_order[np.ix_(np.argsort(perm), np.argsort(perm))], rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize("bias", [True, False])
def test_dense_mode_equals_damped_newton_step(bias):
    params, features, labels = problem(1, bias=bias)
    grads = jax.grad(loss_fn)(params, features, labels)
    tx = natural_gradient(DAMPING, "dense")
    step, _ = tx.update(
        grads, tx.init(params), params, features=features, logits=logits_fn(params, features)
    )
    expected = damped_newton(params, features, labels)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), step, expected
    )


def test_cg_mode_agrees_with_dense_mode():
    params, features, labels = problem(2)
    grads = jax.grad(loss_fn)(params, features, labels)
    dense_tx = natural_gradient(DAMPING, "dense")
    dense_step, _ = dense_tx.update(
        grads, dense_tx.init(params), params, features=features, logits=logits_fn(params, features)
    )
    cg_tx = natural_gradient(DAMPING, "cg", cg_maxiter=200, cg_tol=1e-12)
    cg_step, _ = jax.jit(
        lambda g, s, p: cg_tx.update(g, s, p, fvp_fn=make_ggn_operator(logits_fn, p, features))
    )(grads, cg_tx.init(params), params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10), cg_step, dense_step
    )


def test_dense_factor_refreshes_every_k_steps():
    params, features, labels = problem(3)
    other = features[::-1] * 2.0
    tx = natural_gradient(DAMPING, "dense", refresh_every=2)
    grads = jax.grad(loss_fn)(params, features, labels)
    update = jax.jit(
        lambda s, x: tx.update(grads, s, params, features=x, logits=logits_fn(params, x))
    )
    _, state0 = update(tx.init(params), features)
    _, state1 = update(state0, other)  # step 1: factor kept
    np.testing.assert_array_equal(state1.factor, state0.factor)
    _, state2 = update(state1, other)  # step 2: refreshed from the new features
    assert not np.allclose(state2.factor, state1.factor)
    expected = jnp.linalg.cholesky(
        head_fisher(other, logits_fn(params, other)) + DAMPING * jnp.eye(state2.factor.shape[0])
    )
    np.testing.assert_allclose(state2.factor, expected, rtol=1e-10)


def test_missing_extras_and_masked_use_are_errors():
    params, features, _ = problem(4)
    with pytest.raises(InvalidInputError, match="fvp_fn"):
        tx = natural_gradient(DAMPING)
        tx.update(params, tx.init(params), params)
    with pytest.raises(InvalidInputError, match="features"):
        tx = natural_gradient(DAMPING, "dense")
        tx.update(params, tx.init(params), params)
    with pytest.raises(InvalidInputError, match="dense head"):
        natural_gradient(DAMPING, "dense").init({"w": params["kernel"]})
    masked = optax.masked(natural_gradient(DAMPING), {"kernel": True, "bias": False})
    with pytest.raises(InvalidInputError, match="masked"):
        masked.update(params, masked.init(params), params, fvp_fn=lambda v: v)
    with pytest.raises(InvalidInputError, match="damping"):
        natural_gradient(0.0)


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_the_dense_mode_inside_a_partition_is_refused_in_one_line(wrapper):
    # init indexed the MaskedNode placeholder: "tuple indices must be integers or slices"
    params, _, _ = problem(4)
    dense = natural_gradient(DAMPING, "dense")
    if wrapper == "masked":
        tx = optax.masked(dense, {"kernel": True, "bias": False})
    else:
        labels = {"kernel": "natural", "bias": "plain"}
        tx = optax.multi_transform({"natural": dense, "plain": optax.sgd(0.1)}, labels)
    with pytest.raises(InvalidInputError, match=r"natural_gradient\(mode='dense'\) cannot run"):
        tx.init(params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": float("nan")}, "damping must be positive"),
        ({"damping": DAMPING, "cg_maxiter": 0}, "cg_maxiter must be an integer >= 1"),
        ({"damping": DAMPING, "cg_maxiter": 2.5}, "cg_maxiter must be an integer >= 1"),
        # a fractional interval refreshed at steps 0 and 3 only (count % 1.5 == 0)
        ({"damping": DAMPING, "refresh_every": 1.5}, "refresh_every must be an integer >= 1"),
        ({"damping": DAMPING, "cg_tol": -1.0}, r"cg_tol must lie in \(0, 1\)"),
        ({"damping": DAMPING, "cg_tol": 0.0}, r"cg_tol must lie in \(0, 1\)"),
    ],
)
def test_bad_solver_settings_are_refused_instead_of_returning_zero_updates(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        natural_gradient(**kwargs)


def test_dense_mode_names_features_or_logits_that_do_not_fit_the_head():
    params, features, _ = problem(5)
    tx = natural_gradient(DAMPING, "dense")
    state = tx.init(params)
    logits = logits_fn(params, features)
    with pytest.raises(InvalidInputError, match=r"features must be \(n, 4\)"):
        tx.update(params, state, params, features=features[:, :3], logits=logits)
    with pytest.raises(InvalidInputError, match=r"logits must be \(n, K\) = \(20, 3\)"):
        tx.update(params, state, params, features=features, logits=logits[:5])


@pytest.mark.parametrize("mode", ["cg", "dense"])
def test_damping_can_be_scheduled_with_inject_hyperparams_under_jit(mode):
    params, features, labels = problem(6)
    grads = jax.grad(loss_fn)(params, features, labels)
    static = ("mode", "cg_maxiter", "cg_tol", "refresh_every", "diagonal")
    tx = optax.inject_hyperparams(natural_gradient, static_args=static)(damping=1.0, mode=mode)
    op = make_ggn_operator(logits_fn, params, features)
    extras = (
        {"fvp_fn": op}
        if mode == "cg"
        else {"features": features, "logits": logits_fn(params, features)}
    )
    state = tx.init(params)
    state.hyperparams["damping"] = jnp.asarray(DAMPING)
    step, _ = jax.jit(lambda s: tx.update(grads, s, params, **extras))(state)
    expected = damped_newton(params, features, labels)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), step, expected
    )


def test_dense_mode_keeps_a_float32_factor_for_bfloat16_heads():
    params, features, labels = problem(7)
    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    tx = natural_gradient(DAMPING, "dense")
    state = tx.init(low)
    assert state.factor.dtype == jnp.float32
    grads = jax.tree_util.tree_map(
        lambda g: g.astype(jnp.bfloat16), jax.grad(loss_fn)(params, features, labels)
    )
    step, _ = tx.update(grads, state, low, features=features, logits=logits_fn(params, features))
    assert step["kernel"].dtype == jnp.bfloat16
    expected = damped_newton(params, features, labels)
    np.testing.assert_allclose(
        np.asarray(step["kernel"], np.float64), expected["kernel"], rtol=0.1, atol=0.05
    )


def test_cg_mode_adds_the_diagonal_to_the_damped_fisher():
    """(F + diag(d) + damping I)^-1 g, against the dense solve (NGF's anchor curvature)."""
    params, features, labels = problem(3)
    grads = jax.grad(loss_fn)(params, features, labels)
    diagonal = jax.tree_util.tree_map(
        lambda p: jnp.linspace(0.5, 2.0, p.size, dtype=p.dtype).reshape(p.shape), params
    )
    tx = natural_gradient(DAMPING, "cg", cg_maxiter=200, cg_tol=1e-12, diagonal=diagonal)
    step, _ = jax.jit(
        lambda g, s, p: tx.update(g, s, p, fvp_fn=make_ggn_operator(logits_fn, p, features))
    )(grads, tx.init(params), params)
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: loss_fn(unravel(f), features, labels))(flat)
    matrix = hessian + jnp.diag(ravel_pytree(diagonal)[0]) + DAMPING * jnp.eye(flat.size)
    expected = unravel(jnp.linalg.solve(matrix, ravel_pytree(grads)[0]))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10), step, expected
    )


def test_cg_mode_solves_a_bfloat16_head_with_a_float32_diagonal_in_float32():
    """The docstring's own use, a float32 ``eta_r * Fbar`` steering bfloat16 parameters, had
    failed inside CG's while_loop (a bfloat16 carry came back float32)."""
    params = {"kernel": jnp.ones((4, 3), jnp.bfloat16), "bias": jnp.zeros((3,), jnp.bfloat16)}
    diagonal = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    grads = jax.tree_util.tree_map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape), params)
    tx = natural_gradient(0.1, "cg", diagonal=diagonal, cg_tol=1e-6)
    seen = []

    def fvp_fn(v):  # F = 2 I
        seen.append({x.dtype for x in jax.tree_util.tree_leaves(v)})
        return jax.tree_util.tree_map(lambda x: 2 * x, v)

    low = jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), grads)
    step, _ = tx.update(low, tx.init(params), params, fvp_fn=fvp_fn)
    assert seen[0] == {jnp.dtype(jnp.bfloat16)}  # fvp_fn sees the parameters' dtype
    assert {x.dtype for x in jax.tree_util.tree_leaves(step)} == {jnp.dtype(jnp.bfloat16)}
    expected = jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16) / 2.6, grads)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2
        ),
        step,
        expected,
    )


def test_a_negative_or_misshaped_diagonal_is_refused():
    params, features, labels = problem(7)
    grads = jax.grad(loss_fn)(params, features, labels)
    negative = jax.tree_util.tree_map(lambda p: -jnp.ones_like(p), params)
    with pytest.raises(InvalidInputError, match="diagonal must be non-negative"):
        natural_gradient(DAMPING, "cg", diagonal=negative)
    # dense mode: a whole model's diagonal instead of the head's
    with pytest.raises(InvalidInputError, match="diagonal must be {'kernel'"):
        natural_gradient(DAMPING, "dense", diagonal={"body": params, "head": params})
    tx = natural_gradient(DAMPING, "cg", diagonal={"kernel": jnp.ones((4, 3, 1))})
    op = make_ggn_operator(logits_fn, params, features)
    with pytest.raises(InvalidInputError, match="diagonal must have the pytree structure"):
        tx.update(grads, tx.init(params), params, fvp_fn=op)


def test_dense_mode_takes_a_flax_frozen_dict_head():
    from flax.core import FrozenDict

    params, features, labels = problem(8)
    grads = jax.grad(loss_fn)(params, features, labels)
    tx = natural_gradient(DAMPING, "dense")
    logits = logits_fn(params, features)
    step, _ = tx.update(grads, tx.init(params), params, features=features, logits=logits)
    frozen = FrozenDict(grads)
    frozen_step, _ = tx.update(
        frozen, tx.init(FrozenDict(params)), params, features=features, logits=logits
    )
    assert isinstance(frozen_step, FrozenDict)
    jax.tree_util.tree_map(np.testing.assert_array_equal, dict(frozen_step), step)


@pytest.mark.parametrize(
    "operator",
    ["another_head", "transposed_output", "one_leaf"],
)
def test_cg_mode_refuses_an_fvp_fn_that_does_not_fit_the_updates(operator):
    # each once failed deep inside jax.scipy's cg (shapes, a linearised function, a dict)
    params, features, _ = problem(5)
    other, other_features, _ = problem(6, d=5)
    fvp_fn = {
        "another_head": make_ggn_operator(logits_fn, other, other_features),
        "transposed_output": lambda v: {"kernel": v["kernel"].T, "bias": v["bias"]},
        "one_leaf": lambda v: v["kernel"],
    }[operator]
    tx = natural_gradient(DAMPING)
    with pytest.raises(InvalidInputError, match=r"natural_gradient \(fvp_fn\)"):
        tx.update(params, tx.init(params), params, fvp_fn=fvp_fn)


def test_head_fisher_keeps_a_confident_heads_small_curvature_in_float32():
    # the sum of diag(p) minus the sum of p p^T cancelled in float32: at confident predictions
    # the Fisher had eigenvalues of -1e-7, and a small damping gave a NaN Cholesky factor
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 8)).astype(np.float32)
    logits = (12.0 * np.eye(5)[rng.integers(0, 5, 200)] + rng.normal(size=(200, 5))).astype(
        np.float32
    )
    got = np.asarray(head_fisher(jnp.asarray(features), jnp.asarray(logits)), np.float64)
    h = np.concatenate([features, np.ones((200, 1))], axis=1).astype(np.float64)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = sum(
        np.kron(np.outer(hi, hi), np.diag(pi) - np.outer(pi, pi))
        for hi, pi in zip(h, p, strict=True)
    )
    want /= len(h)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    assert np.linalg.eigvalsh(got).min() > -1e-7 * np.linalg.eigvalsh(want).max()
