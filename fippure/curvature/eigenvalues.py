"""Extreme eigenvalues of a symmetric curvature operator: Lanczos and power iteration.

:func:`lanczos` runs ``m`` steps of the Lanczos process (Lanczos 1950) with *full*
reorthogonalisation (classical Gram-Schmidt applied twice against every stored basis vector),
so the Ritz values of the tridiagonal matrix ``T`` are reliable without the ghost copies of
plain Lanczos in floating point. If the Krylov space is exhausted (``beta`` vanishes, e.g. for a
low-rank GGN), the process restarts from a random vector orthogonal to the basis and records
``beta = 0``, so ``T`` stays an orthogonal projection of the operator. Cost per step: one
operator product plus ``O(m P)`` for the reorthogonalisation; memory: ``m x P`` for the basis.

The basis is stored as flat vectors (``jax.flatten_util.ravel_pytree``, internal only): the
public functions take and return pytrees.

**Loop driver** (``loop=``). XLA:CPU runs a heavy body inside ``lax.fori_loop``/``while_loop``
far more slowly than the same computation called step by step (STYLE.md reports 17x).
Measured here (``experiments/results/curvature_cost.json``, ``lanczos_loop``): HVP operator of
``preact_resnet18`` width 16 on a batch of 128, 2 shared CPU cores, 724 ms per step with the
Python-driven loop against 41 s per step inside ``lax.fori_loop``, **57x slower**. Hence:

- ``"python"`` (default): a Python loop calls one jitted step per iteration (compiled once;
  the operator is passed in as an argument, not baked in as a constant);
- ``"fori"``: the whole process in one ``lax.fori_loop`` (kept for accelerators and tests).

Inside an outer ``jax.jit``, ``"python"`` unrolls Lanczos's ``m`` steps into the traced graph
(fine for its small ``m``; compile time grows with ``m``) and runs power iteration's
``num_iters`` steps in one ``lax.scan`` (its counts run to thousands, whose unrolled graph
takes minutes to compile), so every function here is jit-able. On XLA:CPU the scan pays the
loop-body cost above: 30 power steps on the Hessian of PreAct-ResNet-18 w8 (64 images) took
146 s in the scan against 5.3 s unrolled (whose compilation took 52 s against 18 s) and 6.6 s
called eagerly. On the CPU, call power iteration eagerly (as ``fippure analyze`` does). The
step updates the basis in place (buffer donation) only when nothing is traced and the operator
is one of :mod:`~fippure.curvature.products`' (a plain closure can hide captured tracers), so
both Lanczos loops also work under ``jax.grad`` and ``jax.vmap``. Vectors reach the operator
in the parameters' dtype, while the basis is kept in at least float32.

:func:`power_iteration` finds the eigenvalue of largest magnitude, as PyHessian-style analyses
do (Yao et al., 2020); :func:`largest_eigenvalue` adds a spectral shift so that it returns the
largest *algebraic* eigenvalue ``lambda_max`` even when negative eigenvalues dominate.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.curvature.probes import rademacher, rademacher_like, tree_dot, tree_norm
from fippure.curvature.products import Operator
from fippure.errors import InvalidInputError, is_concrete, require
from fippure.step_inputs import device_indices, step_guard
from fippure.tree_checks import check_operator

PyTree = Any
Loop = Literal["python", "fori"]


class Tridiagonal(NamedTuple):
    """The Lanczos tridiagonal matrix ``T = tridiag(betas, alphas, betas)``.

    Attributes:
        alphas: ``(m,)`` diagonal.
        betas: ``(m - 1,)`` off-diagonal (zeros mark restarts after a breakdown).
    """

    alphas: Float[Array, " m"]
    betas: Float[Array, " m_minus_1"]

    def dense(self) -> Float[Array, "m m"]:
        """``T`` as a dense ``(m, m)`` matrix."""
        return jnp.diag(self.alphas) + jnp.diag(self.betas, 1) + jnp.diag(self.betas, -1)

    def eigh(self) -> tuple[Float[Array, " m"], Float[Array, "m m"]]:
        """Ascending Ritz values and the eigenvectors of ``T`` (columns)."""
        return jnp.linalg.eigh(self.dense())


class _LanczosState(NamedTuple):
    basis: Array  # (m, P); rows past the current step are zero
    alphas: Array  # (m,)
    betas: Array  # (m,); the last entry is unused
    scale: Array  # running max of ||A q||, for the breakdown test


def _as_operator(matvec: Operator) -> Partial:
    """``matvec`` as a pytree, so that it can be an argument of a jitted function."""
    return matvec if isinstance(matvec, Partial) else Partial(matvec)


def _safe_norm(squared: Array) -> Array:
    """``sqrt(squared)``, with a zero derivative where ``squared`` is 0 (the square root's is
    infinite there, and a gradient through an exact breakdown or a zero product was NaN)."""
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _orthogonalise(basis: Array, w: Array) -> Array:
    """Classical Gram-Schmidt against all rows of ``basis``, twice ("twice is enough")."""
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _lanczos_step(matvec, unravel, key, state: _LanczosState, i, vector_dtype) -> _LanczosState:
    basis = state.basis
    q = basis[i]
    # the basis is at least float32; the operator takes vectors of the parameters' dtype
    # (one linearised at bfloat16 parameters refuses float32 tangents)
    w = ravel_pytree(matvec(unravel(q.astype(vector_dtype))))[0].astype(basis.dtype)
    alpha = jnp.vdot(q, w)
    scale = jnp.maximum(state.scale, _safe_norm(jnp.vdot(w, w)))
    w = _orthogonalise(basis, w)
    beta = _safe_norm(jnp.vdot(w, w))
    tol = jnp.sqrt(jnp.finfo(basis.dtype).eps) * jnp.maximum(scale, jnp.finfo(basis.dtype).tiny)
    broken = beta <= tol

    def restart():
        fresh = rademacher(jax.random.fold_in(key, i), w.shape, w.dtype)
        fresh = _orthogonalise(basis, fresh)
        return fresh / jnp.linalg.norm(fresh)

    following = jax.lax.cond(broken, restart, lambda: w / jnp.where(broken, 1.0, beta))
    return _LanczosState(
        basis=basis.at[i + 1].set(following, mode="drop"),
        alphas=state.alphas.at[i].set(alpha),
        betas=state.betas.at[i].set(jnp.where(broken, 0.0, beta)),
        scale=scale,
    )


def _lanczos_step_call(matvec, key, state, i, *, unravel, vector_dtype):
    return _lanczos_step(matvec, unravel, key, state, i, vector_dtype)


_STATIC = ("unravel", "vector_dtype")
_lanczos_step_jit = jax.jit(_lanczos_step_call, static_argnames=_STATIC)
# Donating the state updates the (m, P) basis in place instead of copying it every step. Only
# for concrete arrays: autodiff keeps the inputs as residuals, and vmap changes their shapes.
_lanczos_step_donating = jax.jit(
    _lanczos_step_call, static_argnames=_STATIC, donate_argnames=("state",)
)


def _materialise(like: PyTree) -> PyTree:
    """``like`` with every ``jax.ShapeDtypeStruct`` leaf replaced by zeros of its shape."""
    return jax.tree_util.tree_map(
        lambda leaf: (
            jnp.zeros(leaf.shape, leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        ),
        like,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _lanczos_fori(matvec, key, state, *, unravel, vector_dtype):
    num_iters = state.alphas.shape[0]
    body = lambda i, s: _lanczos_step(matvec, unravel, key, s, i, vector_dtype)
    return jax.lax.fori_loop(0, num_iters, body, state)


def lanczos(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_iters: int,
    *,
    loop: Loop = "python",
) -> Tridiagonal:
    """``num_iters`` Lanczos steps from a normalised Rademacher start vector.

    Args:
        matvec: symmetric ``v -> A v`` on pytrees shaped like ``like`` (an operator from
            ``make_*_operator`` is passed into the jitted steps as an argument; a plain
            closure works too, but its captured arrays are compiled in as constants and its
            steps copy the basis instead of updating it in place).
        like: a pytree with the parameters' structure, shapes and dtypes (arrays or
            ``jax.ShapeDtypeStruct``).
        key: random key (start vector and restarts).
        num_iters: ``m``; capped at the dimension ``P``.
        loop: ``"python"`` (one jitted step per iteration; the default, see the module
            docstring) or ``"fori"`` (one ``lax.fori_loop``). Both are differentiable.

    Returns:
        The :class:`Tridiagonal` ``T`` (``m x m``); its eigenvalues are the Ritz values.
    """
    require(num_iters >= 1, f"num_iters must be positive, got {num_iters}")
    check_operator(matvec, like, "lanczos")
    flat_like, unravel = ravel_pytree(_materialise(like))
    dim = flat_like.shape[0]
    num_iters = min(num_iters, dim)
    # at least float32: bfloat16 Gram-Schmidt is meaningless and eigh has no bfloat16 kernel
    dtype = jnp.promote_types(flat_like.dtype, jnp.float32)
    start_key, restart_key = jax.random.split(key)
    start = rademacher(start_key, (dim,), dtype) / jnp.sqrt(dim).astype(dtype)
    state = _LanczosState(
        basis=jnp.zeros((num_iters, dim), dtype).at[0].set(start),
        alphas=jnp.zeros((num_iters,), dtype),
        betas=jnp.zeros((num_iters,), dtype),
        scale=jnp.zeros((), dtype),
    )
    operator = _as_operator(matvec)
    static = {"unravel": unravel, "vector_dtype": flat_like.dtype}
    if loop == "fori":
        state = _lanczos_fori(operator, restart_key, state, **static)
    elif loop == "python":
        # Donation only where nothing can be traced: an operator of ours carries its arrays
        # as leaves, but a plain closure may capture tracers of an outer jax.grad or jax.vmap
        # that no check can see (autodiff keeps the donated inputs as residuals).
        if isinstance(matvec, Partial) and is_concrete((operator, restart_key, state)):
            # the indices are made on the device ahead (no upload per iteration)
            for i in device_indices(0, num_iters):
                with step_guard():
                    state = _lanczos_step_donating(operator, restart_key, state, i, **static)
        else:
            for i in range(num_iters):
                state = _lanczos_step_jit(operator, restart_key, state, i, **static)
    else:
        raise InvalidInputError(f"unknown loop {loop!r}; use 'python' or 'fori'")
    return Tridiagonal(state.alphas, state.betas[:-1])


def top_eigenvalues(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    k: int = 5,
    num_iters: int | None = None,
    *,
    loop: Loop = "python",
) -> Float[Array, " k"]:
    """The ``k`` largest (algebraic) eigenvalues, in descending order, from Lanczos Ritz values.

    Extreme eigenvalues converge first; with ``num_iters = P`` the result is exact up to
    rounding. Interior ones need more steps than ``k``.

    Differentiable (``jax.grad`` through the operator's parameters): the gradient is that of
    the Ritz values, which equals the eigenvalues' own (``u^T (dA) u``) once they have
    converged; it is undefined where two of the returned eigenvalues coincide.

    Args:
        matvec: symmetric ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key.
        k: number of eigenvalues, at most the dimension ``P``.
        num_iters: Lanczos steps, at least ``k`` (default ``max(4 k, 20)``).
        loop: see :func:`lanczos`.

    Returns:
        ``(k,)`` descending.
    """
    require(k >= 1, f"k must be positive, got {k}")
    num_iters = max(4 * k, 20) if num_iters is None else num_iters
    require(num_iters >= k, f"num_iters must be at least k = {k}, got {num_iters}")
    dim = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(like))
    require(k <= dim, f"k must be at most the number of parameters {dim}, got {k}")
    ritz, _ = lanczos(matvec, like, key, num_iters, loop=loop).eigh()
    return ritz[::-1][:k]


class PowerIterationResult(NamedTuple):
    """Result of :func:`power_iteration`.

    Attributes:
        eigenvalue: the Rayleigh quotient ``v^T A v`` of ``eigenvector``.
        eigenvector: the last unit-norm iterate ``v`` (a pytree shaped like the parameters).
        num_iters: iterations run.
        relative_change: ``|lambda_t - lambda_{t-1}| / |lambda_t|`` at the last iteration.
    """

    eigenvalue: Float[Array, ""]
    eigenvector: PyTree
    num_iters: Array
    relative_change: Float[Array, ""]


def _power_step(matvec, vector):
    product = matvec(vector)
    eigenvalue = tree_dot(vector, product)
    squared = tree_dot(product, product)
    # A v = 0 (a zero operator, or v in its null space): v is an eigenvector for 0, so it is
    # kept; dividing would give NaN, which a traced loop carries to its end
    norm = _safe_norm(squared)
    safe = jnp.where(squared > 0, norm, 1.0)
    return eigenvalue, jax.tree_util.tree_map(
        lambda x, v: jnp.where(squared > 0, x / safe, v).astype(v.dtype), product, vector
    )


def _relative_change(value, previous, shift):
    """``|value - previous| / |value - shift|``: the change relative to the eigenvalue of the
    unshifted operator, when ``value`` is a Rayleigh quotient of ``A + shift I``. Relative to
    ``value`` itself, a large shift would make every change look small and stop the iteration
    before it has moved (``fippure analyze --power-iters 5`` once reported 0.03 for 110)."""
    return jnp.abs(value - previous) / jnp.maximum(jnp.abs(value - shift), 1e-30)


def _power_step_with_change(matvec, vector, previous, shift=0.0):
    """A power step and the Rayleigh quotient's relative change from ``previous``."""
    eigenvalue, following = _power_step(matvec, vector)
    return eigenvalue, following, _relative_change(eigenvalue, previous, shift)


_power_step_jit = jax.jit(_power_step_with_change)


@jax.jit
def _norm_of_product(operator: Partial, vector: Any) -> Array:
    """``||A v||`` in one compiled call (the operator is a pytree argument), with a zero
    derivative where the product is 0 (a zero operator's gradient was NaN)."""
    product = operator(vector)
    return _safe_norm(tree_dot(product, product))


def power_iteration(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_iters: int = 100,
    tol: float = 1e-4,
    *,
    loop: Loop = "python",
    shift: float | Array = 0.0,
) -> PowerIterationResult:
    """The eigenvalue of largest magnitude by power iteration (a Hessian's ``lambda_max`` only
    when no negative eigenvalue is larger in magnitude; :func:`largest_eigenvalue` in general).

    Stops after ``num_iters`` products or once the Rayleigh quotient changes by less than
    ``tol`` relatively. Convergence is geometric in ``|lambda_2 / lambda_1|``, so it can be
    slow for clustered top eigenvalues; :func:`top_eigenvalues` is the robust alternative.

    Args:
        matvec: symmetric ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key for the start vector.
        num_iters: maximum number of products.
        tol: relative tolerance on the eigenvalue.
        loop: ``"python"`` (jitted step, host-side stopping test; under an outer ``jax.jit``,
            ``jax.grad`` or ``jax.vmap``, ``num_iters`` steps in a ``lax.scan``, without the
            test) or
            ``"fori"`` (one ``lax.while_loop`` with the test). Only ``"python"`` can be
            reverse-differentiated (``jax.grad``): JAX cannot transpose a ``while_loop``, whose
            trip count depends on the data; ``"fori"`` supports forward mode (``jax.jvp``).
            The derivative is that of the returned estimate. Where every product vanishes
            (``A = 0``) the eigenvector is undefined: the value is 0, and the derivative is
            the start vector's Rayleigh quotient's, not the limit from nearby operators.
        shift: where ``matvec`` is ``A + shift I`` (as in :func:`largest_eigenvalue`), the
            stopping test measures the change relative to ``|lambda - shift|``, the eigenvalue
            of ``A``; the returned eigenvalue is still ``matvec``'s.

    Returns:
        A :class:`PowerIterationResult`.
    """
    require(num_iters >= 1, f"num_iters must be positive, got {num_iters}")
    check_operator(matvec, like, "power_iteration")
    start = rademacher_like(key, like)
    norm = tree_norm(start)  # at least float32; the vectors keep the parameters' dtypes
    start = jax.tree_util.tree_map(lambda x: (x / norm).astype(x.dtype), start)
    operator = _as_operator(matvec)
    if loop == "fori":
        # on the device explicitly (traced arguments: other values reuse the compiled loop)
        limits = jax.device_put((np.int32(num_iters), float(tol)))
        return _power_fori(operator, start, *limits, shift)
    if loop != "python":
        raise InvalidInputError(f"unknown loop {loop!r}; use 'python' or 'fori'")
    # the first quotient's "previous" value, in tree_dot's dtype (one compilation)
    eigenvalue = jnp.zeros((), jax.eval_shape(tree_dot, start, start).dtype)
    shift = jnp.asarray(shift, eigenvalue.dtype)  # on the device once, not at every step
    if not is_concrete((operator, start, shift)):
        carry = (eigenvalue, start, start, jnp.asarray(jnp.inf, eigenvalue.dtype))
        return _power_scan(operator, carry, num_iters, num_iters, shift)
    change, count = jnp.inf, 0
    vector = following = start
    for count in range(1, num_iters + 1):  # noqa: B007 (count is used after the loop)
        vector = following
        with step_guard():
            eigenvalue, following, change = _power_step_jit(operator, vector, eigenvalue, shift)
        if not is_concrete(change):
            # a plain closure that captures tracers of an outer jax.grad or jax.vmap, which
            # the check above cannot see: the remaining steps run in the scan
            carry = (eigenvalue, vector, following, change)
            return _power_scan(operator, carry, num_iters, num_iters - count, shift)
        if tol > 0 and float(change) < tol:  # no host sync when the test can never stop it
            break
    return PowerIterationResult(eigenvalue, vector, jnp.asarray(count), jnp.asarray(change))


def _power_scan(matvec, carry, num_iters: int, remaining: int, shift) -> PowerIterationResult:
    """The last ``remaining`` of ``num_iters`` power steps in one ``lax.scan``: the
    ``"python"`` loop under an outer transformation. The stopping test needs the host, so every
    step runs; one traced step keeps the compile time flat in ``num_iters`` (unrolled, 4000
    steps of a 4x4 matrix took minutes to compile), and ``scan``, unlike ``while_loop``, can
    be reverse-differentiated. ``carry`` is ``(eigenvalue, vector, following, change)``."""

    def body(carry, _):
        previous, _, following, _ = carry
        value, after, change = _power_step_with_change(matvec, following, previous, shift)
        return (value, following, after, change), None

    (eigenvalue, vector, _, change), _ = jax.lax.scan(body, carry, None, length=remaining)
    return PowerIterationResult(eigenvalue, vector, jnp.asarray(num_iters), change)


@jax.jit
def _power_fori(matvec, start, num_iters, tol, shift):
    """``num_iters`` and ``tol`` are traced (they only enter the loop's condition), so other
    values reuse the compiled loop."""

    def cond(carry):
        *_, count, change = carry
        return (count < num_iters) & (change >= tol)

    def body(carry):
        eigenvalue, _, following, count, _ = carry
        new_value, after = _power_step(matvec, following)
        change = _relative_change(new_value, eigenvalue, shift)
        return new_value, following, after, count + 1, change

    zero = tree_dot(start, start) * 0
    inf = jnp.asarray(jnp.inf, zero.dtype)
    carry = (zero, start, start, jnp.zeros((), jnp.int32), inf)
    eigenvalue, vector, _, count, change = jax.lax.while_loop(cond, body, carry)
    return PowerIterationResult(eigenvalue, vector, count, change)


def _shifted(matvec, shift, vector):
    return jax.tree_util.tree_map(lambda a, v: a + shift * v, matvec(vector), vector)


def largest_eigenvalue(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_iters: int = 100,
    tol: float = 1e-4,
    *,
    loop: Loop = "python",
) -> PowerIterationResult:
    """The largest *algebraic* eigenvalue ``lambda_max`` by power iteration with a shift.

    :func:`power_iteration` finds the eigenvalue of largest magnitude. When that is positive
    and its iterate ``v`` is an eigenvector (``v^T A v`` within 1% of ``rho = ||A v||``), it is
    ``lambda_max``. Otherwise the spectrum's negative end dominates (or ``+rho`` and ``-rho``
    both occur, where the Rayleigh quotient stalls at a value that is no eigenvalue), and power
    iteration runs again on ``A + rho I``, whose eigenvalues ``lambda + rho`` are (up to the
    estimate of ``rho``) non-negative, so its dominant one is ``lambda_max + rho``. A Hessian
    away from a minimum, or after purification, can have negative eigenvalues as large as
    its positive ones, so ``fippure analyze`` reports this, not :func:`power_iteration`.

    Concretely the shifted run happens only when needed; under ``jax.jit``/``jax.grad``/
    ``jax.vmap`` both runs always happen and the result is selected.

    Args:
        matvec: symmetric ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key for the start vectors.
        num_iters: maximum products per power-iteration run.
        tol: relative tolerance on the eigenvalue.
        loop: see :func:`power_iteration`.

    Returns:
        A :class:`PowerIterationResult` for ``lambda_max``; ``num_iters`` counts the products
        of both runs (plus one for ``rho``).
    """
    first_key, shifted_key = jax.random.split(key)
    operator = _as_operator(matvec)
    first = power_iteration(operator, like, first_key, num_iters, tol, loop=loop)
    radius = _norm_of_product(operator, first.eigenvector)
    dominant = (first.eigenvalue > 0) & (first.eigenvalue >= 0.99 * radius)
    if is_concrete((dominant,)) and bool(dominant):
        return first._replace(num_iters=first.num_iters + 1)
    shifted = power_iteration(
        Partial(_shifted, operator, radius),
        like,
        shifted_key,
        num_iters,
        tol,
        loop=loop,
        shift=radius,
    )
    combined = PowerIterationResult(
        shifted.eigenvalue - radius,
        shifted.eigenvector,
        first.num_iters + shifted.num_iters + 1,
        shifted.relative_change,
    )
    if is_concrete((dominant,)):
        return combined
    pick = lambda a, b: jnp.where(dominant, a, b)  # noqa: E731
    return jax.tree_util.tree_map(pick, first._replace(num_iters=combined.num_iters), combined)
