"""Natural-gradient preconditioning ``(F + damping I)^-1 g`` as an optax transformation.

Amari, "Natural gradient works efficiently in learning" (Neural Computation 1998); NGF (Karim
et al., "Efficient Backdoor Removal Through Natural Gradient Fine-tuning", 2023; SPEC section 5)
applies ``theta <- theta - alpha (F + lambda I)^-1 grad`` to one layer. Two modes:

- ``"cg"``: matrix-free. The update receives a Fisher-vector product as the keyword extra
  ``fvp_fn`` (``v -> F v`` on pytrees shaped like the updates, e.g. an operator from
  :func:`fippure.curvature.make_ggn_operator` built inside the jitted step) and solves
  ``(F + damping I) x = g`` by conjugate gradient (``jax.scipy.sparse.linalg.cg``).
- ``"dense"``: an exact Cholesky solve for a dense softmax head (SPEC section 5), where the true
  Fisher is known in closed form from the head's input features ``h_i`` and its logits:

      F = mean_i (h~_i h~_i^T) kron (diag(p_i) - p_i p_i^T),   h~_i = [h_i; 1].

  **Ordering.** Flax stores a Dense layer as ``kernel`` ``(d, K)`` and ``bias`` ``(K,)``. Stacking
  the bias as an extra row gives ``Theta = [kernel; bias]`` of shape ``(d + 1, K)`` with
  ``logits_i = h~_i^T Theta``; its row-major flattening (index ``j * K + k``) is the order in
  which the Fisher above is written. SPEC writes ``(diag(p) - p p^T) kron (h h^T)``: the same
  matrix for the class-major order (``Theta^T`` flattened), i.e. a permutation of ours.
  The update is mapped to and from this order internally; callers pass and receive the
  ``{'kernel', 'bias'}`` pytree (a head without bias, ``{'kernel'}`` only, uses ``h~ = h``).
  The factor ``chol(F + damping I)`` lives in the state and is refreshed every
  ``refresh_every`` steps (``lax.cond``: no work on the other steps); the extras
  ``features`` ``(n, d)`` and ``logits`` ``(n, K)`` must be passed on every step.

Keep this transformation outside ``optax.masked``/``optax.partition`` (their ``MaskedNode``
placeholders would reach ``fvp_fn``): compute gradients of the trained subset only and chain
``natural_gradient`` on them, e.g.
``optax.chain(optax.clip_by_global_norm(1.0), natural_gradient(1e-3), optax.scale(-lr))``
called as ``tx.update(grads, state, params, fvp_fn=op)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from fippure.errors import InvalidInputError, is_concrete
from fippure.tree_checks import (
    check_fits,
    check_operator,
    has_negative_entries,
    refuse_masked,
)

PyTree = Any
Mode = Literal["cg", "dense"]


class NaturalGradientState(NamedTuple):
    """State of :func:`natural_gradient`.

    Attributes:
        count: number of updates so far.
        factor: ``"dense"`` mode: the lower Cholesky factor of ``F + damping I``, ``(P, P)``
            in the ``[kernel; bias]`` row-major order (see the module docstring), last
            refreshed at a step that is a multiple of ``refresh_every``, in the kernel's dtype
            promoted to at least float32. ``"cg"`` mode: ``None``.
    """

    count: Int[Array, ""]
    factor: Float[Array, "p p"] | None


def head_fisher(
    features: Float[Array, "n d"], logits: Float[Array, "n k"], use_bias: bool = True
) -> Float[Array, "p p"]:
    """The exact true Fisher of mean softmax cross-entropy w.r.t. a dense head.

    ``F = mean_i (h~_i h~_i^T) kron (diag(p_i) - p_i p_i^T)`` in the ``[kernel; bias]`` row-major
    order (index ``j * K + k``; see the module docstring).

    Args:
        features: the head's inputs ``h_i``.
        logits: the head's outputs.
        use_bias: append the constant 1 to the features (a head with a bias).

    Returns:
        ``(P, P)`` with ``P = (d + use_bias) * K``.
    """
    if use_bias:
        features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
    probs = jax.nn.softmax(logits, axis=-1)
    n, d = features.shape
    k = probs.shape[-1]
    # Each example's softmax block A_i = diag(p_i) - p_i p_i^T, with its diagonal written as
    # p_ia * sum_{b != a} p_ib: no difference of nearly equal terms (p_ia - p_ia^2 for a
    # confident prediction), so every block stays diagonally dominant, hence PSD, in float32.
    # (Summing diag(p) and p p^T over the examples first and subtracting once lost the
    # small curvature of confident predictions: eigenvalues of -1e-7 at a trained head.)
    off = 1.0 - jnp.eye(k, dtype=probs.dtype)
    others = probs @ off  # (n, K): sum_{b != a} p_ib
    blocks = jnp.eye(k, dtype=probs.dtype) * (probs * others)[:, :, None] - off * (
        probs[:, :, None] * probs[:, None, :]
    )
    # F[j, a, l, b] = mean_i h_ij h_il A_i[a, b], no per-example Hessians.
    fisher = jnp.einsum("ij,il,iab->jalb", features, features, blocks)
    return fisher.reshape(d * k, d * k) / n


def _head_to_vector(tree: PyTree) -> Array:
    kernel = tree["kernel"]
    if "bias" in tree:
        kernel = jnp.concatenate([kernel, tree["bias"][None]], axis=0)
    return kernel.reshape(-1)


def _vector_to_head(vector: Array, like: PyTree) -> PyTree:
    d, k = like["kernel"].shape
    rows = vector.reshape(-1, k)
    out = {"kernel": rows[:d].astype(like["kernel"].dtype)}
    if "bias" in like:
        out["bias"] = rows[d].astype(like["bias"].dtype)
    return out if type(like) is dict else type(like)(out)  # e.g. a Flax FrozenDict head


def _check_head(tree: PyTree, name: str = "updates") -> None:
    if not isinstance(tree, Mapping) or "kernel" not in tree or set(tree) - {"kernel", "bias"}:
        keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise InvalidInputError(
            "natural_gradient(mode='dense') preconditions one dense head: "
            f"{name} must be {{'kernel': (d, K), 'bias': (K,)}}, got {keys}; use mode='cg' for "
            "other parameter sets"
        )
    if jnp.ndim(tree["kernel"]) != 2:
        raise InvalidInputError(
            f"dense head kernel must be (d, K), got {jnp.shape(tree['kernel'])} in {name}"
        )


def _check_head_inputs(updates: PyTree, features: Array, logits: Array) -> None:
    """One-line errors for ``features``/``logits`` that do not fit the head ``(d, K)``."""
    d, k = jnp.shape(updates["kernel"])
    if jnp.ndim(features) != 2 or jnp.shape(features)[1] != d:
        raise InvalidInputError(
            f"features must be (n, {d}) for a ({d}, {k}) head kernel, got {jnp.shape(features)}"
        )
    if jnp.shape(logits) != (jnp.shape(features)[0], k):
        raise InvalidInputError(
            f"logits must be (n, K) = ({jnp.shape(features)[0]}, {k}) to match features "
            f"{jnp.shape(features)} and the head, got {jnp.shape(logits)}"
        )


def natural_gradient(
    damping: float,
    mode: Mode = "cg",
    *,
    cg_maxiter: int = 50,
    cg_tol: float = 1e-5,
    refresh_every: int = 1,
    diagonal: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions the updates with ``(F + diag(diagonal) + damping I)^-1``.

    Args:
        damping: ``lambda > 0``.
        mode: ``"cg"`` (matrix-free; needs the extra ``fvp_fn``) or ``"dense"`` (Cholesky for
            a dense softmax head; needs the extras ``features`` and ``logits``).
        cg_maxiter: conjugate-gradient iterations (``"cg"``).
        cg_tol: relative residual tolerance of conjugate gradient (``"cg"``).
        refresh_every: recompute the Cholesky factor every this many steps (``"dense"``). A
            ``damping`` or ``diagonal`` changed in between (by ``optax.inject_hyperparams``,
            say) takes effect at the next refresh, as in K-FAC's amortised inverses.
        diagonal: an optional non-negative pytree shaped like the parameters added to the
            curvature, e.g. the Hessian ``eta_r * Fbar`` of a Fisher anchor chained before this
            transformation, so that the anchor's own step stays bounded by the learning rate
            (NGF, :mod:`fippure.purify.ngf`).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword-only
        extras ``fvp_fn: Callable[[PyTree], PyTree]`` (``"cg"``) or ``features: (n, d)`` and
        ``logits: (n, K)`` (``"dense"``); other extras (forwarded by ``optax.chain``) are
        ignored. State: :class:`NaturalGradientState`.
    """
    # Only concrete values are checked: under ``optax.inject_hyperparams`` the factory is
    # called inside ``update`` with traced hyper-parameters (a damping schedule).
    if is_concrete(damping) and not np.asarray(damping) > 0:  # also refuses NaN
        raise InvalidInputError(f"damping must be positive, got {damping}")
    if mode not in ("cg", "dense"):
        raise InvalidInputError(f"unknown natural_gradient mode {mode!r}; use 'cg' or 'dense'")
    for name, count in (("refresh_every", refresh_every), ("cg_maxiter", cg_maxiter)):
        # a step count: 1.5 would refresh at steps 0 and 3 only (count % 1.5 == 0)
        if not is_concrete(count):
            continue
        whole = np.issubdtype(np.asarray(count).dtype, np.integer)
        if not (whole and np.asarray(count) >= 1):
            raise InvalidInputError(f"{name} must be an integer >= 1, got {count!r}")
    if is_concrete(cg_tol) and not 0 < np.asarray(cg_tol) < 1:
        raise InvalidInputError(f"cg_tol must lie in (0, 1), got {cg_tol}")
    if diagonal is not None:
        if mode == "dense":
            _check_head(diagonal, "diagonal")
        if has_negative_entries(diagonal):
            raise InvalidInputError(
                "natural_gradient: diagonal must be non-negative (a negative one can make "
                "F + diag + damping I indefinite, and the step ascend)"
            )

    def init_fn(params):
        if mode == "cg":
            factor = None
        else:
            refuse_masked(params, "natural_gradient(mode='dense')", "it factors the whole head")
            _check_head(params)
            size = _head_to_vector(params).shape[0]
            # the factor is kept in at least float32 (no Cholesky in bfloat16 or float16)
            dtype = jnp.promote_types(params["kernel"].dtype, jnp.float32)
            factor = jnp.sqrt(jnp.asarray(damping, dtype)) * jnp.eye(size, dtype=dtype)
        return NaturalGradientState(jnp.zeros((), jnp.int32), factor)

    def cg_update(updates, state, fvp_fn):
        if fvp_fn is None:
            raise InvalidInputError("natural_gradient(mode='cg') needs the extra fvp_fn=")
        refuse_masked(updates, "natural_gradient", "its placeholders would reach fvp_fn")
        if diagonal is not None:
            check_fits(diagonal, updates, "diagonal", "natural_gradient")
        check_operator(fvp_fn, updates, "natural_gradient (fvp_fn)")

        # solved in at least float32, as the dense factor is kept: fvp_fn sees vectors in the
        # parameters' dtype, and a float32 diagonal may steer bfloat16 parameters
        def wide(tree):
            return jax.tree_util.tree_map(
                lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree
            )

        def damped(v):
            fv = wide(fvp_fn(jax.tree_util.tree_map(lambda x, u: x.astype(u.dtype), v, updates)))
            if diagonal is not None:
                fv = jax.tree_util.tree_map(
                    lambda a, d, b: a + d.astype(a.dtype) * b, fv, diagonal, v
                )
            return jax.tree_util.tree_map(lambda a, b: a + damping * b, fv, v)

        solution, _ = jsp.sparse.linalg.cg(damped, wide(updates), tol=cg_tol, maxiter=cg_maxiter)
        solution = jax.tree_util.tree_map(lambda s, u: s.astype(u.dtype), solution, updates)
        return solution, state._replace(count=optax.safe_increment(state.count))

    def dense_update(updates, state, features, logits):
        refuse_masked(updates, "natural_gradient(mode='dense')", "it factors the whole head")
        _check_head(updates)
        if features is None or logits is None:
            raise InvalidInputError(
                "natural_gradient(mode='dense') needs the extras features= and logits="
            )
        _check_head_inputs(updates, features, logits)
        if diagonal is not None:
            check_fits(diagonal, updates, "diagonal", "natural_gradient")
        use_bias = "bias" in updates
        dtype = state.factor.dtype

        def refresh():
            fisher = head_fisher(features.astype(dtype), logits.astype(dtype), use_bias)
            shift = damping * jnp.ones(fisher.shape[0], dtype)
            if diagonal is not None:
                full = jax.tree_util.tree_map(
                    lambda d, u: jnp.broadcast_to(d, jnp.shape(u)), diagonal, updates
                )
                shift = shift + _head_to_vector(full).astype(dtype)
            return jnp.linalg.cholesky(fisher + jnp.diag(shift))

        factor = jax.lax.cond(state.count % refresh_every == 0, refresh, lambda: state.factor)
        gradient = _head_to_vector(updates).astype(dtype)
        solution = jsp.linalg.cho_solve((factor, True), gradient)
        new_state = NaturalGradientState(optax.safe_increment(state.count), factor)
        return _vector_to_head(solution, updates), new_state

    def update_fn(
        updates,
        state,
        params=None,
        *,
        fvp_fn: Callable[[PyTree], PyTree] | None = None,
        features: Float[Array, "n d"] | None = None,
        logits: Float[Array, "n k"] | None = None,
        **extra_args,
    ):
        del params, extra_args
        if mode == "cg":
            return cg_update(updates, state, fvp_fn)
        return dense_update(updates, state, features, logits)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
