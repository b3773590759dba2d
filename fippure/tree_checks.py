"""Checks that a pytree argument fits the parameters it acts on, with one-line errors.

A Fisher diagonal, an anchor, a bound or a curvature diagonal that is shaped slightly wrong
(a transposed kernel, a ``(C, 1)`` bias) would otherwise broadcast silently: the update, and
after ``optax.apply_updates`` the parameter, would take the broadcast shape, and the error
would surface later in ``model.apply``. These checks run on shapes and tree structure only, so
they cost nothing under ``jit`` (they run once, at trace time).
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fippure.errors import InvalidInputError

PyTree = Any


def is_masked(x: Any) -> bool:
    """Whether ``x`` is the placeholder ``optax.masked`` puts in place of a frozen leaf."""
    return isinstance(x, optax.MaskedNode)


def refuse_masked(tree: PyTree, transformation: str, reason: str) -> None:
    """One-line error when a transformation that cannot work on a subset of the parameters
    receives ``optax.masked``/``optax.multi_transform``'s placeholders (they reached deep code
    before, as a ``TypeError`` about tuple indices or ``MaskedNode`` operands)."""
    if any(is_masked(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_masked)):
        raise InvalidInputError(
            f"{transformation} cannot run inside optax.masked or optax.multi_transform "
            f"({reason}); compute gradients of the trained subset and chain it on those"
        )


#: Concrete ``jax.Array`` leaves already found non-negative, by ``id``, each with a weak
#: reference that tells a live array from a new one given a freed array's ``id``. JAX arrays
#: are immutable, so a leaf judged once need not be copied to the host again: a factory
#: called at every update (``optax.inject_hyperparams`` rebuilds its inner transformation
#: each step) would otherwise copy a whole Fisher diagonal to the host per step.
_NON_NEGATIVE: dict[int, weakref.ref] = {}


def _known_non_negative(leaf: Any) -> bool:
    ref = _NON_NEGATIVE.get(id(leaf))
    return ref is not None and ref() is leaf


def _remember_non_negative(leaf: Any) -> None:
    def forget(ref: weakref.ref, key: int = id(leaf)) -> None:
        if _NON_NEGATIVE.get(key) is ref:
            del _NON_NEGATIVE[key]

    _NON_NEGATIVE[id(leaf)] = weakref.ref(leaf, forget)


def has_negative_entries(tree: PyTree) -> bool:
    """Whether a concrete ``tree`` holds a negative entry (a traced one is not judged).

    Judged on the host: inside a jit trace, a JAX comparison on even a concrete array is
    traced, and its truth value cannot be read. A ``jax.Array`` leaf found non-negative is
    remembered and not copied again.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return False
    for leaf in leaves:
        if _known_non_negative(leaf):
            continue
        if np.any(np.asarray(leaf) < 0):
            return True
        if isinstance(leaf, jax.Array):
            _remember_non_negative(leaf)
    return False


def _paths(tree: PyTree) -> list[str]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
    return [jax.tree_util.keystr(path) for path, _ in leaves]


def _first(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")


def check_fits(
    tree: PyTree,
    params: PyTree,
    name: str,
    where: str,
    *,
    exact: bool = False,
    same_dtype: bool = False,
    reference: str = "params",
) -> None:
    """Raises :class:`InvalidInputError` unless ``tree`` has the structure of ``params`` and each
    of its leaves broadcasts against its parameter without changing the parameter's shape.

    Leaves of ``params`` that ``optax.masked`` replaced by ``MaskedNode`` are skipped.

    Args:
        tree: the argument to check (e.g. a Fisher diagonal).
        params: the parameters (or updates) it must fit.
        name: the argument's name, for the message.
        where: the function's name, for the message.
        reference: the name of ``params`` in the message.
        exact: require each leaf's shape to equal its parameter's (no broadcasting), as a
            vector in a matrix-vector product must.
        same_dtype: also require each leaf's dtype to be its parameter's, as a ``jax.jvp``
            tangent must.
    """
    if jax.tree_util.tree_structure(tree, is_leaf=is_masked) != jax.tree_util.tree_structure(
        params, is_leaf=is_masked
    ):
        want, got = _paths(params), _paths(tree)
        parts = []
        if missing := [p for p in want if p not in got]:
            parts.append(f"missing {_first(missing)}")
        if extra := [p for p in got if p not in want]:
            parts.append(f"unexpected {_first(extra)}")
        detail = "; ".join(parts) or "the same leaves in other containers (dict, FrozenDict)"
        raise InvalidInputError(
            f"{where}: {name} must have the pytree structure of {reference} ({detail})"
        )
    pairs, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_masked)
    for (path, param), leaf in zip(pairs, leaves, strict=True):
        if is_masked(param):
            continue
        shape, leaf_shape = np.shape(param), np.shape(leaf)
        try:
            fits = (leaf_shape if exact else np.broadcast_shapes(leaf_shape, shape)) == shape
        except ValueError:
            fits = False
        if not fits:
            relation = "is not" if exact else "does not broadcast to"
            raise InvalidInputError(
                f"{where}: {name}{jax.tree_util.keystr(path)} has shape {leaf_shape}, which "
                f"{relation} {shape}, the shape of {reference}{jax.tree_util.keystr(path)}"
            )
        if same_dtype and jnp.result_type(leaf) != jnp.result_type(param):
            raise InvalidInputError(
                f"{where}: {name}{jax.tree_util.keystr(path)} is {jnp.result_type(leaf)}, but "
                f"{reference}{jax.tree_util.keystr(path)} is {jnp.result_type(param)}; cast it "
                "to the parameters' dtype"
            )


def _shape_of(leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))


def check_operator(matvec: Any, like: PyTree, where: str) -> None:
    """Raises :class:`InvalidInputError` unless ``matvec`` maps a vector shaped like ``like`` to
    one of the same structure and shapes (as a symmetric operator on the parameters must).

    It traces ``matvec`` once on shapes (``jax.eval_shape``), so nothing runs on the device; an
    operator built for other parameters is refused here, naming the argument, instead of
    failing inside JAX with a message about the linearised function.
    """
    vector = jax.tree_util.tree_map(_shape_of, like)
    try:
        product = jax.eval_shape(matvec, vector)
    except (TypeError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise InvalidInputError(
            f"{where}: the operator does not accept a vector shaped like `like` (is it built "
            f"for other parameters?): {reason}"
        ) from None
    check_fits(product, vector, "the operator's output", where, exact=True, reference="like")
