"""Every matrix-free product equals the dense matrix times a vector (float64, 1e-8 relative)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.curvature import products
from fippure.curvature.probes import tree_dot
from fippure.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("x64")

RTOL = 1e-8


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.linalg.norm(expected), 1e-300)
    assert np.linalg.norm(actual - expected) <= rtol * scale, (actual, expected)


def jitted(fn, *args):
    """``fn(*args)`` under ``jax.jit`` (one compile instead of eager op-by-op dispatch)."""
    return jax.jit(fn)(*args)


def test_hessian_vector_product(problem, dense, random_tree):
    v = random_tree(0, problem.params)
    expected = dense.hessian @ dense.flatten(v)
    result = jitted(
        lambda p, v: products.hvp(problem.loss_fn, p, problem.batch, v), problem.params, v
    )
    assert_close(dense.flatten(result), expected)


def test_ggn_vector_product(problem, dense, random_tree):
    v = random_tree(1, problem.params)
    expected = dense.ggn @ dense.flatten(v)
    result = jitted(
        lambda p, v: products.ggn_vp(problem.logits_fn, p, problem.batch, v), problem.params, v
    )
    assert jax.tree_util.tree_structure(result) == jax.tree_util.tree_structure(problem.params)
    assert_close(dense.flatten(result), expected)


def test_ggn_vp_counts_every_leading_axis_of_the_logits_as_examples(problem, random_tree):
    """Logits of shape (..., K) (a sequence model's, say) average over all the leading axes:
    (n, K) logits and the same logits as (1, n, K) are the same n examples."""
    v = random_tree(1, problem.params)
    flat = products.ggn_vp(problem.logits_fn, problem.params, problem.batch, v)
    lifted = products.ggn_vp(
        lambda p, b: problem.logits_fn(p, b)[None], problem.params, problem.batch, v
    )
    jax.tree_util.tree_map(lambda a, b: assert_close(a, b), flat, lifted)


def test_ggn_equals_true_fisher(problem, dense, random_tree):
    # The exact expectation over y ~ p of the score outer product is the GGN of softmax CE.
    np.testing.assert_allclose(dense.true_fisher, dense.ggn, rtol=1e-10, atol=1e-12)
    v = random_tree(2, problem.params)
    result = jitted(
        lambda p, v: products.fisher_vp(problem.logits_fn, p, problem.batch, v), problem.params, v
    )
    assert_close(dense.flatten(result), dense.true_fisher @ dense.flatten(v))
    # ...and it differs from the Hessian and from the empirical Fisher (a non-vacuous check).
    assert not np.allclose(dense.ggn, dense.hessian, rtol=1e-3)
    assert not np.allclose(dense.ggn, dense.empirical_fisher, rtol=1e-3)


def test_empirical_fisher_vector_product(problem, dense, random_tree):
    v = random_tree(3, problem.params)
    expected = dense.empirical_fisher @ dense.flatten(v)
    result = jitted(
        lambda p, v: products.empirical_fisher_vp(problem.per_example_loss_fn, p, problem.batch, v),
        problem.params,
        v,
    )
    assert_close(dense.flatten(result), expected)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_operator_reused_across_vectors_and_passed_into_jit(problem, dense, random_tree, kind):
    make = {
        "hessian": lambda: products.make_hvp_operator(
            problem.loss_fn, problem.params, problem.batch
        ),
        "ggn": lambda: products.make_ggn_operator(problem.logits_fn, problem.params, problem.batch),
        "empirical_fisher": lambda: products.make_empirical_fisher_operator(
            problem.per_example_loss_fn, problem.params, problem.batch
        ),
    }[kind]
    matrix = getattr(dense, kind)
    # Built under jit and returned from it: the operator is a pytree of residuals...
    operator = jax.jit(make)()
    assert jax.tree_util.tree_leaves(operator)
    # ...so it can be an argument of a jitted function and be reused across vectors.
    apply = jax.jit(lambda op, v: op(v))
    for seed in range(3):
        v = random_tree(10 + seed, problem.params)
        assert_close(dense.flatten(apply(operator, v)), matrix @ dense.flatten(v))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_operators_rebuilt_eagerly_compile_their_consumer_once(problem, dense, kind):
    """A curvature check every epoch rebuilds the operator at new parameters; with the same
    function the operator keeps its static part, so a jitted consumer does not recompile."""
    make, fn = {
        "hessian": (products.make_hvp_operator, problem.loss_fn),
        "ggn": (products.make_ggn_operator, problem.logits_fn),
        "empirical_fisher": (products.make_empirical_fisher_operator, problem.per_example_loss_fn),
    }[kind]
    apply = jax.jit(lambda op, v: op(v))
    results = []
    for scale in (1.0, 0.9, 1.1):
        params = jax.tree_util.tree_map(lambda p, s=scale: p * s, problem.params)
        results.append(dense.flatten(apply(make(fn, params, problem.batch), problem.params)))
    assert apply._cache_size() == 1
    # each operator is the curvature at its own parameters, not a stale cached one
    matrix = getattr(dense, kind)
    assert_close(results[0], matrix @ dense.flatten(problem.params))
    assert not np.allclose(results[1], results[0]) and not np.allclose(results[2], results[0])


def test_an_unhashable_loss_function_still_gives_an_operator(problem, dense, random_tree):
    class Loss:  # defines __eq__ without __hash__, so it cannot be a static argument
        def __eq__(self, other):
            return isinstance(other, Loss)

        def __call__(self, params, batch):
            return problem.loss_fn(params, batch)

    operator = products.make_hvp_operator(Loss(), problem.params, problem.batch)
    v = random_tree(4, problem.params)
    assert_close(dense.flatten(operator(v)), dense.hessian @ dense.flatten(v))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_a_batch_with_a_python_flag_still_gives_an_operator(problem, dense, random_tree, kind):
    # the flag was traced by the factory's jit, and branching on it raised
    # TracerBoolConversionError (the one-shot hvp, which does not jit, worked)
    def flagged(fn):
        return lambda p, b: fn(p, b["data"]) * (2.0 if b["double"] else 1.0)

    batch = {"data": problem.batch, "double": np.bool_(False)}  # a NumPy scalar flag, too
    if kind == "hessian":
        operator = products.make_hvp_operator(flagged(problem.loss_fn), problem.params, batch)
    elif kind == "ggn":
        operator = products.make_ggn_operator(flagged(problem.logits_fn), problem.params, batch)
    else:
        per_example = flagged(problem.per_example_loss_fn)
        operator = products.make_empirical_fisher_operator(per_example, problem.params, batch)
    v = random_tree(5, problem.params)
    assert_close(dense.flatten(operator(v)), getattr(dense, kind) @ dense.flatten(v))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_the_quadratic_form_of_each_product_is_differentiable(problem, random_tree, kind):
    """``jax.grad`` of ``v^T M(theta) v`` agrees with finite differences, through both the
    one-shot products and the operators."""
    from jax.test_util import check_grads

    v = random_tree(6, problem.params)
    one_shot = {
        "hessian": lambda p: products.hvp(problem.loss_fn, p, problem.batch, v),
        "ggn": lambda p: products.ggn_vp(problem.logits_fn, p, problem.batch, v),
        "empirical_fisher": lambda p: products.empirical_fisher_vp(
            problem.per_example_loss_fn, p, problem.batch, v
        ),
    }[kind]
    factory, fn = {
        "hessian": (products.make_hvp_operator, problem.loss_fn),
        "ggn": (products.make_ggn_operator, problem.logits_fn),
        "empirical_fisher": (products.make_empirical_fisher_operator, problem.per_example_loss_fn),
    }[kind]
    for product in (one_shot, lambda p: factory(fn, p, problem.batch)(v)):
        quadratic = lambda p, product=product: tree_dot(v, product(p))  # noqa: E731
        check_grads(quadratic, (problem.params,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_softmax_hessian_vp_matches_dense(x64):
    logits = jax.random.normal(jax.random.key(0), (4, 5), np.float64)
    u = jax.random.normal(jax.random.key(1), (4, 5), np.float64)
    p = np.asarray(jax.nn.softmax(logits))
    expected = np.stack(
        [(np.diag(q) - np.outer(q, q)) @ x for q, x in zip(p, np.asarray(u), strict=True)]
    )
    assert_close(products.softmax_hessian_vp(logits, u), expected)


@pytest.mark.parametrize("name", ["hvp", "ggn_vp", "empirical_fisher_vp"])
def test_a_vector_not_shaped_or_typed_like_params_is_refused_by_name(problem, name):
    fn = {
        "hvp": problem.loss_fn,
        "ggn_vp": problem.logits_fn,
        "empirical_fisher_vp": problem.per_example_loss_fn,
    }[name]
    part = {k: v for k, v in list(problem.params.items())[:1]}
    with pytest.raises(InvalidInputError, match=f"{name}: vector must have the pytree structure"):
        getattr(products, name)(fn, problem.params, problem.batch, part)
    column = jax.tree_util.tree_map(lambda p: p[..., None], problem.params)
    with pytest.raises(InvalidInputError, match=f"{name}: vector.* has shape"):
        getattr(products, name)(fn, problem.params, problem.batch, column)
    # a jvp tangent must have its primal's dtype (JAX's own error names no leaf)
    dtype = jax.tree_util.tree_leaves(problem.params)[0].dtype
    other = jnp.float32 if dtype == jnp.float64 else jnp.float16
    recast = jax.tree_util.tree_map(lambda p: p.astype(other), problem.params)
    with pytest.raises(InvalidInputError, match=f"{name}: vector.* is {jnp.dtype(other)}, but"):
        getattr(products, name)(fn, problem.params, problem.batch, recast)


def test_tree_dot_accumulates_bfloat16_leaves_in_float32():
    # summed in bfloat16, 1e5 ones gave 99840
    ones = {"a": jnp.ones((100_000,), jnp.bfloat16), "b": jnp.ones((3,), jnp.bfloat16)}
    total = tree_dot(ones, ones)
    assert total.dtype == jnp.float32 and float(total) == 100_003.0
    assert tree_dot({"a": np.ones(3)}, {"a": np.ones(3)}).dtype == jnp.float64  # under x64
    # integers stay exact (float32 would round 2**24 + 1 to 2**24)
    ints = {"a": np.array([2**24 + 1], np.int64)}
    assert int(tree_dot(ints, {"a": np.array([1], np.int64)})) == 2**24 + 1


def test_tree_dot_refuses_leaves_that_would_broadcast():
    a = {"w": np.ones(3)}
    with pytest.raises(InvalidInputError, match=r"tree_dot: b\['w'\] has shape \(3, 1\)"):
        tree_dot(a, {"w": np.ones((3, 1))})
    assert float(tree_dot(a, {"w": np.arange(3.0)})) == 3.0


def test_softmax_hessian_vp_keeps_a_confident_rows_small_curvature_in_float32():
    # p * (u - <p, u>) subtracted two nearly equal numbers when one p_a was near 1: the
    # confident class's entry came out 0 or a whole rounding step off in float32
    rng = np.random.default_rng(0)
    logits = (16.0 * np.eye(6)[rng.integers(0, 6, 32)] + rng.normal(size=(32, 6))).astype(
        np.float32
    )
    u = rng.normal(size=(32, 6)).astype(np.float32)
    got = np.asarray(products.softmax_hessian_vp(jnp.asarray(logits), jnp.asarray(u)), np.float64)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.stack([(np.diag(q) - np.outer(q, q)) @ x for q, x in zip(p, u, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0)
