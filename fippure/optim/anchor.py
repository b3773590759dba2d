"""Fisher-weighted anchor to reference parameters (EWC-style), as an optax transformation.

FIP (SPEC section 2) and NGF (SPEC section 5) regularise towards the original weights
``theta0`` with ``(eta_r / 2) sum_j Fbar_j (theta_j - theta0_j)^2``, where ``Fbar`` is the
diagonal empirical Fisher of ``theta0`` on the clean set (Kirkpatrick et al., "Overcoming
catastrophic forgetting in neural networks", PNAS 2017, eq. 3). Its gradient,
``eta_r * Fbar * (theta - theta0)``, is what :func:`fisher_anchor` adds to the updates, so the
anchor composes with any optimiser: ``optax.chain(fisher_anchor(F, theta0, eta_r),
optax.sgd(lr, momentum))``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int

from fippure.errors import InvalidInputError, is_concrete
from fippure.tree_checks import check_fits, has_negative_entries, is_masked

PyTree = Any


class FisherAnchorState(NamedTuple):
    """State of :func:`fisher_anchor`.

    The Fisher diagonal and the anchor live in the state (not in a closure) so that a jitted
    step receives them as arguments instead of compiling them in as constants, and so that a
    checkpointed optimiser state resumes without recomputing them.

    Attributes:
        count: number of updates so far (drives a ``strength`` schedule).
        fisher_diag: ``Fbar``, shaped like the parameters.
        anchor_params: ``theta0``, shaped like the parameters.
    """

    count: Int[Array, ""]
    fisher_diag: PyTree
    anchor_params: PyTree


def fisher_anchor(
    fisher_diag: PyTree, anchor_params: PyTree, strength: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Adds ``strength * fisher_diag * (params - anchor_params)`` to the updates.

    This is the gradient of ``(strength / 2) sum_j F_j (theta_j - theta0_j)^2``. Place it
    before the optimiser's scaling, on gradients. It needs ``params`` in ``update``.

    Works inside ``optax.masked``: leaves that the mask freezes (``optax.MaskedNode``) are
    passed through, and ``fisher_diag``/``anchor_params`` may cover the full parameter tree.

    Args:
        fisher_diag: the diagonal Fisher ``F``, a pytree shaped like the parameters (e.g.
            :func:`fippure.curvature.empirical_fisher_diagonal` of the original model).
        anchor_params: the anchor ``theta0``, shaped like the parameters.
        strength: ``eta_r`` (a float or an ``optax`` schedule of the step count).

    Returns:
        An ``optax.GradientTransformation`` with a :class:`FisherAnchorState`.

    Raises:
        InvalidInputError: a negative ``strength`` or Fisher entry (a schedule's value is
            judged at each eager ``update``; traced values under ``jit`` are not checked), or
            (at ``init``/``update``) a ``fisher_diag``, ``anchor_params`` or ``updates`` whose
            structure or leaf shapes do not fit the parameters.
    """
    if not callable(strength) and is_concrete(strength) and not np.asarray(strength) >= 0:
        raise InvalidInputError(f"fisher_anchor: strength must be >= 0, got {strength}")
    if has_negative_entries(fisher_diag):
        raise InvalidInputError("fisher_anchor: fisher_diag has negative entries (a Fisher is PSD)")
    schedule = strength if callable(strength) else (lambda _: strength)

    def check(params, fisher, anchor):
        check_fits(fisher, params, "fisher_diag", "fisher_anchor")
        check_fits(anchor, params, "anchor_params", "fisher_anchor")

    def init_fn(params):
        check(params, fisher_diag, anchor_params)
        return FisherAnchorState(jnp.zeros((), jnp.int32), fisher_diag, anchor_params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise InvalidInputError("fisher_anchor needs params: call update(g, state, params)")
        check(params, state.fisher_diag, state.anchor_params)
        check_fits(updates, params, "updates", "fisher_anchor", exact=True)
        scale = schedule(state.count)
        if is_concrete(scale) and not np.asarray(scale) >= 0:  # a schedule's value (eager)
            raise InvalidInputError(
                f"fisher_anchor: strength must be >= 0, but its schedule gave {scale} at step "
                f"{state.count}"
            )

        def add(update, param, fisher, anchor):
            if is_masked(update):
                return update
            term = scale * fisher * (param - anchor)
            return (update + term).astype(update.dtype)

        updates = jax.tree_util.tree_map(
            add, updates, params, state.fisher_diag, state.anchor_params, is_leaf=is_masked
        )
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def anchor_penalty(
    strength: float | Array, fisher_diag: PyTree, params: PyTree, anchor_params: PyTree
) -> Array:
    """The anchor's value ``(strength / 2) sum_j F_j (theta_j - theta0_j)^2``, whose gradient
    :func:`fisher_anchor` adds to the updates (for a loss curve that reports the objective).

    Args:
        strength: ``eta_r``, a float or scalar array (a schedule's value, not the schedule).
        fisher_diag: the diagonal Fisher ``F``, shaped like ``params`` (leaves may broadcast).
        params: the current parameters ``theta``.
        anchor_params: the anchor ``theta0``, shaped like ``params``.

    Returns:
        The scalar penalty.

    Raises:
        InvalidInputError: a ``fisher_diag`` or ``anchor_params`` that does not fit ``params``
            (structure, or a leaf that would broadcast to another shape).
    """
    check_fits(fisher_diag, params, "fisher_diag", "anchor_penalty")
    check_fits(anchor_params, params, "anchor_params", "anchor_penalty")
    leaves = jax.tree_util.tree_leaves
    terms = zip(leaves(fisher_diag), leaves(params), leaves(anchor_params), strict=True)
    return 0.5 * strength * sum(jnp.sum(f * (p - a) ** 2) for f, p, a in terms)
