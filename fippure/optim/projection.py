"""Projection onto a box ``lower <= theta <= upper`` after each update, as an optax transformation.

Optax transformations return *updates*, not parameters, so a projection is expressed as the
update that lands on the projected point: ``u' = clip(theta + u, lower, upper) - theta``. Put
:func:`project_box` last in a chain (after ``scale(-lr)``), so ``optax.apply_updates`` gives
``theta + u' = clip(theta + u)`` (up to one rounding of the addition; :func:`clip_to_box` clips
exactly). NFT (SPEC section 4) uses it for its mask floor: ``mu(l) <= m <= 1`` with a per-layer
``mu(l)`` (see :func:`fippure.optim.masks.layer_floors`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fippure.errors import InvalidInputError, is_concrete
from fippure.tree_checks import check_fits, is_masked

PyTree = Any
Bound = float | PyTree


class ProjectBoxState(NamedTuple):
    """State of :func:`project_box`: the bounds of the last call, one array per parameter leaf.

    The fields are not named like :func:`project_box`'s arguments, so that
    ``optax.tree_utils.tree_get(state, "upper")`` under ``optax.inject_hyperparams`` finds the
    hyper-parameter alone (and ``tree_set`` changes it without reshaping the state).

    Attributes:
        lower_bounds: lower bounds, shaped like the parameters (each leaf broadcasts against
            its parameter: a scalar per layer or a full array).
        upper_bounds: upper bounds, likewise.
    """

    lower_bounds: PyTree
    upper_bounds: PyTree


def _per_leaf(bound: Bound, params: PyTree, name: str, where: str) -> PyTree:
    """A bound given as one scalar or as a pytree matching ``params``, as arrays per leaf.

    Raises:
        InvalidInputError: a pytree bound whose structure or leaf shapes do not fit ``params``
            (a leaf may broadcast against its parameter, but not change its shape).
    """
    if isinstance(bound, int | float) or getattr(bound, "ndim", None) == 0:
        return jax.tree_util.tree_map(
            lambda p: p if is_masked(p) else jnp.asarray(bound, p.dtype), params, is_leaf=is_masked
        )
    check_fits(bound, params, name, where)
    return jax.tree_util.tree_map(
        lambda p, b: p if is_masked(p) else jnp.asarray(b, p.dtype),
        params,
        bound,
        is_leaf=is_masked,
    )


def _check_ordered(low: PyTree, high: PyTree, lower: Bound, upper: Bound, where: str) -> None:
    """One line for bounds per leaf that are NaN or crossed (``lower > upper``); concrete
    bounds only (judged on the host: a comparison under jit is traced)."""
    if not is_concrete((low, high)):
        return
    ordered = jax.tree_util.tree_map(
        lambda a, b: bool(np.all(np.asarray(a) <= np.asarray(b))), low, high, is_leaf=is_masked
    )
    if not all(jax.tree_util.tree_leaves(ordered)):
        raise InvalidInputError(
            f"{where} needs bounds with lower <= upper (and no NaN), got {lower} and {upper}"
        )


def project_box(lower: Bound, upper: Bound) -> optax.GradientTransformation:
    """Keeps ``params + updates`` inside ``[lower, upper]`` (per leaf).

    Args:
        lower: a scalar for every leaf, or a pytree with the parameters' structure whose
            leaves broadcast against the parameters (e.g. NFT's ``mu(l)`` per mask layer).
        upper: likewise.

    Returns:
        An ``optax.GradientTransformation`` (needs ``params`` in ``update``) with a
        :class:`ProjectBoxState`. The bounds are cast to each leaf's dtype (for bfloat16
        masks a bound of 0.3 becomes 0.30078). Works inside ``optax.masked`` (frozen leaves
        pass through), and under ``optax.inject_hyperparams`` (each update clips to the
        bounds it is given: a schedule anneals a floor).
    """

    def bounds(params):
        state = ProjectBoxState(
            _per_leaf(lower, params, "lower", "project_box"),
            _per_leaf(upper, params, "upper", "project_box"),
        )
        _check_ordered(*state, lower, upper, "project_box")
        return state

    def init_fn(params):
        return bounds(params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise InvalidInputError("project_box needs params: call update(u, state, params)")
        # The bounds are this call's (not init's): under optax.inject_hyperparams they follow
        # a schedule, or a value written into the state's hyperparams.
        del state
        state = bounds(params)

        def project(update, param, low, high):
            if is_masked(update):
                return update
            return (jnp.clip(param + update, low, high) - param).astype(update.dtype)

        updates = jax.tree_util.tree_map(project, updates, params, *state, is_leaf=is_masked)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_to_box(params: PyTree, lower: Bound, upper: Bound) -> PyTree:
    """``clip(params, lower, upper)`` leaf by leaf, with bounds as in :func:`project_box`.

    Args:
        params: a pytree of arrays.
        lower: a scalar, or a pytree with the structure of ``params`` whose leaves broadcast
            against its leaves.
        upper: likewise.

    Returns:
        ``params`` clipped leaf by leaf (bounds cast to each leaf's dtype).

    Raises:
        InvalidInputError: a pytree bound that does not fit ``params``, or bounds that are
            NaN or crossed (``lower > upper``; ``jnp.clip`` would return ``upper`` everywhere).
    """
    low = _per_leaf(lower, params, "lower", "clip_to_box")
    high = _per_leaf(upper, params, "upper", "clip_to_box")
    _check_ordered(low, high, lower, upper, "clip_to_box")
    return jax.tree_util.tree_map(jnp.clip, params, low, high)
