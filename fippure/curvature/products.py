"""Matrix-free curvature-vector products: Hessian, GGN / true Fisher and empirical Fisher.

All three act on parameter pytrees and never form a matrix. Conventions (used by every module
of :mod:`fippure.curvature`):

- ``loss_fn(params, batch) -> scalar``: the mean loss whose Hessian is wanted.
- ``logits_fn(params, batch) -> (n, K)``: the network's logits; the loss is taken to be the
  mean softmax cross-entropy over the ``n`` rows, so the GGN is
  ``G = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` with ``J_i = d logits_i / d params``
  (Schraudolph 2002; Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020). For softmax cross-entropy the logit-space Hessian does not depend on the label,
  so the GGN *equals* the true Fisher ``E_{y ~ p}[g g^T]``.
- ``per_example_loss_fn(params, batch) -> (n,)``: per-example negative log-likelihoods. The
  empirical Fisher is ``F_emp = (1/n) J^T J`` with ``J = d losses / d params`` (``n x P``);
  it is the matrix behind SPEC section 2's ``Tr F`` and ``Fbar``.

``batch`` is any pytree the function understands (an image array, an ``(images, labels)``
tuple...). For Flax models, apply BatchNorm in eval mode (``train=False``) so that examples do
not couple through batch statistics.

Each product comes in two forms:

- a one-shot function (``hvp``, ``ggn_vp``, ``empirical_fisher_vp``) for a single vector;
- a ``make_*_operator`` factory that linearises the network once (``jax.linearize`` and
  ``jax.linear_transpose``) and returns an :data:`Operator` ``v -> M v`` whose later calls
  skip the primal forward pass. Operators are :class:`jax.tree_util.Partial` objects: pytrees
  whose leaves are the saved residuals, so they can be passed *as arguments* into jitted
  functions (the Lanczos and Hutchinson drivers do this) instead of being baked into the
  compiled program as constants. Their static part holds the traced linearisation. The
  factories are jitted with the function as a static argument, so the same function (the
  same Python object) always gives the same static part, and a jitted consumer compiles once
  however often the operator is rebuilt (a curvature check every epoch). A *new* function
  object, e.g. a lambda created inside the loop, means new compiles: create it once.
  ``batch`` is traced, so its arrays may change between rebuilds; a function that cannot be
  hashed, or a ``batch`` holding a non-array leaf (a Python flag), is linearised without the
  jit.

Everything here is jit-able and differentiable (``jax.grad`` of ``v^T M v`` with respect to the
parameters is checked against finite differences in float64), and works on arbitrary
parameter pytrees.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, Float

from fippure.errors import InvalidInputError
from fippure.tree_checks import check_fits

PyTree = Any
#: ``(params, batch) -> scalar`` mean loss.
LossFn = Callable[[PyTree, Any], Float[Array, ""]]
#: ``(params, batch) -> (n, K)`` logits of a softmax classifier.
LogitsFn = Callable[[PyTree, Any], Float[Array, "n k"]]
#: ``(params, batch) -> (n,)`` per-example negative log-likelihoods.
PerExampleLossFn = Callable[[PyTree, Any], Float[Array, " n"]]
#: ``v -> M v`` on pytrees shaped like the parameters.
Operator = Callable[[PyTree], PyTree]


def check_per_example_losses(losses: Any, where: str) -> None:
    """A one-line error when a "per-example" loss function returned a scalar (their mean)."""
    if jnp.ndim(losses) != 1:
        raise InvalidInputError(
            f"{where}: per_example_loss_fn must return one loss per example, shape (n,); got "
            f"shape {jnp.shape(losses)}. Pass the per-example losses, not their mean"
        )


def _rows(logits: Array) -> int:
    """Number of examples in a ``(..., K)`` logits array (all leading axes)."""
    return logits.size // logits.shape[-1]


def softmax_hessian_vp(
    logits: Float[Array, "n k"], tangents: Float[Array, "n k"]
) -> Float[Array, "n k"]:
    """Row-wise product with the logit-space Hessian of softmax cross-entropy.

    For each row, ``(diag(p) - p p^T) u = p * (u - <p, u>)`` with ``p = softmax(logits)``.
    This matrix is the Hessian of ``-log softmax(z)_y`` in ``z`` for every label ``y``.
    Each entry is evaluated as ``p_a * sum_{b != a} p_b (u_a - u_b)``, which is the same
    number without the difference ``u_a - <p, u>`` of nearly equal terms: at a confident
    prediction (``p_a`` near 1) that difference lost every digit in float32.

    Args:
        logits: ``(..., K)`` logits.
        tangents: ``(..., K)`` logit-space vectors ``u``.

    Returns:
        ``(..., K)`` products.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    k = probs.shape[-1]
    off = 1.0 - jnp.eye(k, dtype=probs.dtype)
    others = probs @ off  # sum_{b != a} p_b, without forming 1 - p_a
    weighted_others = (probs * tangents) @ off  # sum_{b != a} p_b u_b
    return probs * (tangents * others - weighted_others)


# --- Hessian ------------------------------------------------------------------------------


def hvp(loss_fn: LossFn, params: PyTree, batch: Any, vector: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

    ``H v = d/dt grad L(params + t v) |_{t=0}``: one ``jax.jvp`` of ``jax.grad`` (Pearlmutter
    1994, "Fast exact multiplication by the Hessian").

    Args:
        loss_fn: ``(params, batch) -> scalar``.
        params: where the Hessian is taken.
        batch: the data ``loss_fn`` reads.
        vector: a pytree shaped like ``params``.

    Returns:
        ``H v``, shaped like ``params``.
    """
    check_fits(vector, params, "vector", "hvp", exact=True, same_dtype=True)
    grad_fn = jax.grad(loss_fn)
    return jax.jvp(lambda p: grad_fn(p, batch), (params,), (vector,))[1]


def make_hvp_operator(loss_fn: LossFn, params: PyTree, batch: Any) -> Operator:
    """The Hessian as an operator ``v -> H v``, linearised once.

    ``jax.linearize`` of the gradient runs the forward and backward passes once and keeps the
    residuals; each call of the returned operator then costs one linear (tangent) pass.

    Args:
        loss_fn: ``(params, batch) -> scalar``.
        params: where the Hessian is taken.
        batch: the data ``loss_fn`` reads.

    Returns:
        A :class:`jax.tree_util.Partial` ``v -> H v``.
    """
    return _build(_linearised_hessian, loss_fn, params, batch)


def _build(linearise: Callable, fn: Callable, params: PyTree, batch: Any) -> Operator:
    """``linearise(fn, params, batch)``, jitted with ``fn`` static: the same function then always
    gives an operator with the same static part (the traced linearisation), so jitted
    consumers compile once for it, however often the operator is rebuilt eagerly. A function
    that cannot be hashed (so cannot be static), or a ``batch`` with a leaf that is not an
    array (a Python flag such as ``train=False`` that the function branches on, which the jit
    would trace), is linearised without the jit."""
    try:
        hash(fn)
    except TypeError:
        return linearise.__wrapped__(fn, params, batch)
    arrays = (jax.Array, np.ndarray)  # not NumPy scalars: np.bool_(False) is a flag too
    if not all(isinstance(leaf, arrays) for leaf in jax.tree_util.tree_leaves(batch)):
        return linearise.__wrapped__(fn, params, batch)
    return linearise(fn, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _linearised_hessian(loss_fn: LossFn, params: PyTree, batch: Any) -> Operator:
    grad_fn = jax.grad(loss_fn)
    _, linear = jax.linearize(lambda p: grad_fn(p, batch), params)
    return linear


# --- GGN / true Fisher --------------------------------------------------------------------


def _apply_ggn(jvp_fn: Operator, vjp_fn: Callable, logits: Array, vector: PyTree) -> PyTree:
    tangents = jvp_fn(vector)
    cotangents = softmax_hessian_vp(logits, tangents) / _rows(logits)
    return vjp_fn(cotangents.astype(logits.dtype))[0]


def make_ggn_operator(logits_fn: LogitsFn, params: PyTree, batch: Any) -> Operator:
    """The GGN (= true Fisher) of mean softmax cross-entropy as an operator ``v -> G v``.

    ``G v = (1/n) J^T H_z (J v)``: ``J v`` by the linearised forward pass, ``H_z`` in closed form
    (:func:`softmax_hessian_vp`), ``J^T`` by the transpose of the same linearisation (SPEC
    section 8). The forward pass runs once, when the operator is made.

    Args:
        logits_fn: ``(params, batch) -> (n, K)``.
        params: where the GGN is taken.
        batch: the data ``logits_fn`` reads.

    Returns:
        A :class:`jax.tree_util.Partial` ``v -> G v``.
    """
    return _build(_linearised_ggn, logits_fn, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _linearised_ggn(logits_fn: LogitsFn, params: PyTree, batch: Any) -> Operator:
    logits, jvp_fn = jax.linearize(lambda p: logits_fn(p, batch), params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    return Partial(_apply_ggn, jvp_fn, vjp_fn, logits)


def ggn_vp(logits_fn: LogitsFn, params: PyTree, batch: Any, vector: PyTree) -> PyTree:
    """GGN-vector product ``G v`` for mean softmax cross-entropy (one forward pass).

    Equal to the true-Fisher-vector product; see :func:`make_ggn_operator`.

    Args:
        logits_fn: ``(params, batch) -> (n, K)``.
        params: where the GGN is taken.
        batch: the data ``logits_fn`` reads.
        vector: a pytree shaped like ``params``.

    Returns:
        ``G v``, shaped like ``params``.
    """
    check_fits(vector, params, "vector", "ggn_vp", exact=True, same_dtype=True)
    return make_ggn_operator(logits_fn, params, batch)(vector)


#: The true Fisher of a softmax classifier equals its GGN (Martens 2020).
fisher_vp = ggn_vp
make_fisher_operator = make_ggn_operator


# --- empirical Fisher ---------------------------------------------------------------------


def _apply_empirical_fisher(jvp_fn: Operator, vjp_fn: Callable, vector: PyTree) -> PyTree:
    tangents = jvp_fn(vector)
    return vjp_fn(tangents / tangents.size)[0]


def make_empirical_fisher_operator(
    per_example_loss_fn: PerExampleLossFn, params: PyTree, batch: Any
) -> Operator:
    """The empirical Fisher ``F_emp = (1/n) J^T J`` as an operator ``v -> F_emp v``.

    ``J v`` is one linearised forward pass of the *vector* of per-example losses and ``J^T u``
    its transpose, so per-example gradients are never materialised (SPEC section 2).

    Args:
        per_example_loss_fn: ``(params, batch) -> (n,)`` per-example negative log-likelihoods.
        params: where the Fisher is taken.
        batch: the data the function reads.

    Returns:
        A :class:`jax.tree_util.Partial` ``v -> F_emp v``.
    """
    return _build(_linearised_empirical_fisher, per_example_loss_fn, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _linearised_empirical_fisher(
    per_example_loss_fn: PerExampleLossFn, params: PyTree, batch: Any
) -> Operator:
    losses, jvp_fn = jax.linearize(lambda p: per_example_loss_fn(p, batch), params)
    check_per_example_losses(losses, "the empirical Fisher")
    vjp_fn = jax.linear_transpose(jvp_fn, params)
    return Partial(_apply_empirical_fisher, jvp_fn, vjp_fn)


def empirical_fisher_vp(
    per_example_loss_fn: PerExampleLossFn, params: PyTree, batch: Any, vector: PyTree
) -> PyTree:
    """Empirical-Fisher-vector product ``(1/n) J^T (J v)``: one jvp and one transposed jvp.

    Args:
        per_example_loss_fn: ``(params, batch) -> (n,)``.
        params: where the Fisher is taken.
        batch: the data the function reads.
        vector: a pytree shaped like ``params``.

    Returns:
        ``F_emp v``, shaped like ``params``.
    """
    check_fits(vector, params, "vector", "empirical_fisher_vp", exact=True, same_dtype=True)
    return make_empirical_fisher_operator(per_example_loss_fn, params, batch)(vector)
