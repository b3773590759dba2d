"""Random probe vectors and inner products on parameter pytrees.

Hutchinson's estimator and stochastic Lanczos quadrature draw probes ``v`` with
``E[v v^T] = I``. Rademacher entries (+1 or -1 with equal probability) give the smallest
variance of ``v^T A v`` among i.i.d. probes (Hutchinson 1989).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.errors import InvalidInputError, require
from fippure.tree_checks import check_fits

PyTree = Any


def rademacher_like(key: PRNGKeyArray, tree: PyTree) -> PyTree:
    """A pytree shaped like ``tree`` with i.i.d. +-1 entries (in each leaf's dtype).

    Args:
        key: a JAX random key.
        tree: a pytree of arrays (or ``jax.ShapeDtypeStruct``).

    Returns:
        The probe, with the structure, shapes and dtypes of ``tree``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    for path, leaf in zip(paths, leaves, strict=True):
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise InvalidInputError(
                f"curvature is taken w.r.t. floating-point parameters; leaf {path or '(root)'} "
                f"has dtype {leaf.dtype}: keep integer state (step counters) out of the params"
            )
    keys = jax.random.split(key, max(len(leaves), 1))
    probes = [rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=False)]
    return jax.tree_util.tree_unflatten(treedef, probes)


def rademacher(key: PRNGKeyArray, shape: tuple[int, ...], dtype: Any) -> Array:
    """Independent +-1 entries of ``dtype``: :func:`jax.random.rademacher`'s draws, with its
    coin pinned to float32, so that a key gives the same probe whether or not
    ``jax_enable_x64`` is on (jax's own flips a default-dtype coin, float64 under x64)."""
    heads = jax.random.bernoulli(key, jnp.float32(0.5), shape).astype(dtype)
    return (2 * heads - 1).astype(dtype)


def widened(x: Array) -> Array:
    """``x`` in at least float32: squares and sums of bfloat16 or float16 products (a float16
    square overflows past 256) are taken there, as :func:`tree_dot` takes its sums."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def tree_dot(a: PyTree, b: PyTree) -> Float[Array, ""]:
    """``<a, b>``: the sum over all leaves of the elementwise products; floating leaves are
    accumulated and returned in at least float32 (a bfloat16 sum of 1e5 ones read 99840).

    Args:
        a: a pytree of arrays.
        b: a pytree with the structure and leaf shapes of ``a``.

    Returns:
        The scalar ``<a, b>`` (0 for trees without leaves).

    Raises:
        InvalidInputError: ``a`` and ``b`` differ in structure or in a leaf's shape (a
            broadcast product would silently give another number).
    """
    check_fits(b, a, "b", "tree_dot", exact=True, reference="a")

    def leaf_dot(x, y):
        dtype = jnp.result_type(x, y)
        # only inexact leaves are widened: integers stay exact (float32 rounds above 2**24)
        wide = (
            jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.inexact) else dtype
        )
        return jnp.sum(jnp.asarray(x, wide) * jnp.asarray(y, wide))

    products = jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf_dot, a, b))
    return functools.reduce(jnp.add, products) if products else jnp.zeros(())


def tree_norm(a: PyTree) -> Float[Array, ""]:
    """The Euclidean norm of a pytree seen as one vector.

    Args:
        a: a pytree of arrays.

    Returns:
        The scalar ``sqrt(<a, a>)``, accumulated as in :func:`tree_dot`.
    """
    return jnp.sqrt(tree_dot(a, a))


def map_probes(
    fn: Callable[[PRNGKeyArray], Any], key: PRNGKeyArray, num_probes: int, vmap: bool = False
) -> Any:
    """``fn`` applied to ``num_probes`` independent keys split from ``key``, stacked on axis 0.

    By default the probes run one after the other (a Python loop: under ``jax.jit`` the probes
    are unrolled into one graph, and a linearisation computed outside ``fn`` is shared by all).
    ``vmap=True`` vectorises them instead, which suits tiny models and many probes. On XLA:CPU
    the vmapped tangents of a convnet compile and run more slowly: the gradient of the trace
    penalty on ``preact_resnet18`` width 16, batch 128, took 2.6 s looped against 5.0 s
    vmapped with 4 probes (compile 24 s against 35 s), and 1.06 s against 1.23 s with one
    (``experiments/results/curvature_cost.json``, ``probes``), hence the default.

    Args:
        fn: ``key -> pytree`` for one probe.
        key: random key.
        num_probes: how many probes (positive).
        vmap: vectorise with ``jax.vmap`` instead of looping.

    Returns:
        ``fn``'s outputs stacked along a new leading axis.
    """
    require(num_probes >= 1, f"num_probes must be positive, got {num_probes}")
    keys = jax.random.split(key, num_probes)
    if vmap:
        return jax.vmap(fn)(keys)
    outputs = [fn(keys[i]) for i in range(num_probes)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)
