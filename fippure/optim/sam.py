"""Sharpness-aware minimisation (SAM) and its adaptive variant (ASAM) for FT-SAM.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization" (ICLR
2021): step with the gradient taken at the worst nearby point ``theta + eps``,
``eps = rho g / ||g||``. Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-
Invariant Learning of Deep Neural Networks" (ICML 2021), make the neighbourhood scale-invariant
with the normalisation operator ``T = diag(|theta| + eta)``:

    eps = rho T^2 g / ||T g||.

FT-SAM (Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023; SPEC section 6) is ASAM fine-tuning with ``rho = 2.0`` (and
``eta = 0.01``).

``optax.contrib.sam`` runs an outer optimiser and an "adversarial" inner optimiser whose
updates are the perturbation; ASAM only changes how the inner optimiser normalises the
gradient, and that normalisation needs the parameters, which optax passes to the inner
optimiser. So :func:`adaptive_sam` is ``optax.contrib.sam`` with
``chain(normalize_adaptive(eta), sgd(rho))`` as the adversary. For training loops that prefer a
plain function, :func:`asam_gradient` computes the ASAM gradient of a loss directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fippure.errors import InvalidInputError, is_concrete
from fippure.tree_checks import check_fits, refuse_masked

PyTree = Any


def _normaliser(params: PyTree, eta: float, adaptive: bool) -> PyTree:
    if not adaptive:
        return jax.tree_util.tree_map(jnp.ones_like, params)
    return jax.tree_util.tree_map(lambda p: jnp.abs(p) + eta, params)


def asam_perturbation(
    grads: PyTree, params: PyTree, rho: float, eta: float = 0.01, adaptive: bool = True
) -> PyTree:
    """``eps = rho T^2 g / ||T g||`` with ``T = |theta| + eta`` (``T = 1`` if not adaptive).

    Args:
        grads: ``g`` at ``params``.
        params: ``theta``.
        rho: neighbourhood radius.
        eta: keeps ``T`` positive at zero weights (ASAM's ``eta``).
        adaptive: ASAM (True) or plain SAM (False).

    Returns:
        ``eps``, shaped like ``params``.
    """
    scale = _normaliser(params, eta, adaptive)
    scaled = jax.tree_util.tree_map(jnp.multiply, scale, grads)
    # guarded before the square root, whose derivative at 0 is infinite: a zero gradient
    # then gives eps = 0 with finite derivatives, not NaN ones
    squared = optax.tree.norm(scaled, squared=True)
    norm = jnp.sqrt(jnp.where(squared > 0, squared, 1.0))
    return jax.tree_util.tree_map(lambda t, tg: rho * t * tg / norm, scale, scaled)


def normalize_adaptive(eta: float = 0.01, adaptive: bool = True) -> optax.GradientTransformation:
    """Maps ``g`` to ``T^2 g / ||T g||`` (ASAM's ascent direction; ``optax.contrib.normalize``
    when ``adaptive`` is False). Needs ``params`` in ``update``.

    Args:
        eta: ASAM's ``eta`` (``T = |theta| + eta``).
        adaptive: ASAM (True) or plain SAM's ``g / ||g||`` (False).

    Returns:
        A stateless ``optax.GradientTransformation``.

    Raises:
        InvalidInputError: a negative ``eta``; at ``update``, when ``params`` is not given.
    """
    check_radius(0.0, eta)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise InvalidInputError("normalize_adaptive needs params")
        return asam_perturbation(updates, params, 1.0, eta, adaptive), state

    return optax.GradientTransformation(init_fn, update_fn)


def check_radius(rho: Any, eta: Any) -> None:
    """One-line errors for a negative radius (its perturbation would go downhill, which is not
    SAM) or a negative ``eta`` (concrete values only; traced ones pass)."""
    if is_concrete(rho) and not np.asarray(rho) >= 0:
        raise InvalidInputError(f"rho must be >= 0, got {rho}")
    if is_concrete(eta) and not np.asarray(eta) >= 0:
        raise InvalidInputError(f"eta must be >= 0, got {eta}")


def adaptive_sam(
    optimizer: optax.GradientTransformation,
    rho: float = 2.0,
    eta: float = 0.01,
    *,
    adaptive: bool = True,
    opaque_mode: bool = True,
    reset_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """ASAM (or SAM) around ``optimizer``, built on ``optax.contrib.sam``.

    In the default ``opaque_mode`` every ``update`` is one full ASAM step and needs the extra
    ``grad_fn(params, i) -> grads`` (called once, at the perturbed point):
    ``tx.update(grads, state, params, grad_fn=lambda p, _: jax.grad(loss)(p, batch))``. With
    ``opaque_mode=False`` the perturbation and the real step alternate over two ``update``
    calls (see ``optax.contrib.sam``).

    **What the step is made of.** The step is ``optimizer`` applied to ``grad_fn(theta +
    eps)``; the incoming updates only choose the direction of ``eps``. So a transform chained
    *before* ``adaptive_sam`` (clipping, a Fisher anchor, a scale) steers the perturbation
    and nothing else: put it inside ``optimizer``, or its term in ``grad_fn``'s loss. For the
    same reason ``optax.apply_if_finite(adaptive_sam(...))`` judges the incoming gradient,
    not ``grad_fn``'s, and ``optax.MultiSteps(adaptive_sam(...), k)`` steps with the last
    micro-batch's ``grad_fn`` alone; accumulate inside ``grad_fn`` (or around ``optimizer``)
    instead.

    Args:
        optimizer: the outer optimiser (e.g. SGD with momentum and weight decay). Extras
            other than ``grad_fn`` reach it (e.g. ``natural_gradient``'s ``fvp_fn``).
        rho: neighbourhood radius (FT-SAM: 2.0).
        eta: ASAM's ``eta``.
        adaptive: ASAM (True) or plain SAM (False).
        opaque_mode: see above.
        reset_state: reset the adversary's state after each step (it is stateless here).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (state: ``optax.contrib.SAMState``) whose
        ``update`` takes ``grad_fn`` and passes other extras on to ``optimizer`` (which
        ignores them unless it takes extras), so it can share an ``optax.chain`` with
        transforms that need other extras.

    Raises:
        InvalidInputError: an ``optimizer`` that is not an optax transformation, a negative
            ``rho`` or ``eta``; at ``update``, missing ``params`` or ``grad_fn``, or a
            ``grad_fn`` whose gradients are not shaped like ``params``.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise InvalidInputError(
            "adaptive_sam wraps an optax optimizer (e.g. optax.sgd(0.01, momentum=0.9)), got "
            f"{type(optimizer).__name__}"
        )
    check_radius(rho, eta)
    adversary = optax.chain(normalize_adaptive(eta, adaptive), optax.sgd(rho))
    outer = optax.with_extra_args_support(optimizer)

    def sam_with(extra_args):
        # optax.contrib.sam calls the optimizer without extras: these are bound to it
        def update_outer(updates, state, params=None):
            return outer.update(updates, state, params, **extra_args)

        return optax.contrib.sam(
            optax.GradientTransformation(outer.init, update_outer),
            adversary,
            sync_period=2,
            reset_state=reset_state,
            opaque_mode=opaque_mode,
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is None:
            how = "grad_fn at params + eps" if opaque_mode else "the ascent step from params"
            call = ", grad_fn=..." if opaque_mode else ""
            raise InvalidInputError(
                f"adaptive_sam needs params (it takes {how}): update(grads, state, params{call})"
            )
        if opaque_mode:  # the transparent mode calls no grad_fn and works on a masked subset
            refuse_masked(params, "adaptive_sam", "grad_fn would receive the masked parameters")
        if opaque_mode and grad_fn is None:
            raise InvalidInputError(
                "adaptive_sam needs the extra grad_fn=: update(grads, state, params, "
                "grad_fn=lambda p, i: jax.grad(loss)(p, batch))"
            )
        if grad_fn is not None:
            grad_fn = _shaped_like(grad_fn, params)
        return sam_with(extra_args).update(updates, state, params, grad_fn=grad_fn)

    return optax.GradientTransformationExtraArgs(sam_with({}).init, update_fn)


def _shaped_like(grad_fn: Callable, params: PyTree) -> Callable:
    """``grad_fn`` with a one-line error for gradients of another structure or shapes than
    ``params`` (the step would silently take their structure)."""

    def checked(perturbed, i):
        grads = grad_fn(perturbed, i)
        check_fits(grads, params, "grad_fn's gradients", "adaptive_sam", exact=True)
        return grads

    return checked


def asam_gradient(
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args: Any,
    rho: float = 2.0,
    eta: float = 0.01,
    adaptive: bool = True,
    has_aux: bool = False,
) -> tuple[Any, PyTree]:
    """The (A)SAM gradient ``grad L(theta + eps)`` and the value at ``theta``.

    Two backward passes: ``g = grad L(theta)``, ``eps`` by :func:`asam_perturbation`, then
    ``grad L(theta + eps)``.

    Args:
        loss_fn: ``loss_fn(params, *args)`` returning a scalar, or ``(scalar, aux)`` if
            ``has_aux``.
        params: ``theta``.
        *args: further arguments of ``loss_fn`` (the batch...).
        rho: neighbourhood radius.
        eta: ASAM's ``eta``.
        adaptive: ASAM (True) or plain SAM (False).
        has_aux: as in ``jax.value_and_grad``.

    Returns:
        ``(value, grads)`` like ``jax.value_and_grad``: ``value`` (with its aux, e.g. updated
        BatchNorm statistics) from the unperturbed point and ``grads`` from the perturbed one.
    """
    check_radius(rho, eta)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    value, grads = value_and_grad(params, *args)
    eps = asam_perturbation(grads, params, rho, eta, adaptive)
    perturbed = jax.tree_util.tree_map(jnp.add, params, eps)
    _, sharp_grads = value_and_grad(perturbed, *args)
    return value, sharp_grads
