"""Hutchinson estimators of the trace and the diagonal of a curvature matrix.

Hutchinson (1989): for probes ``v`` with ``E[v v^T] = I``, ``Tr(A) = E[v^T A v]``. Bekas,
Kokiopoulou and Saad (2007): ``diag(A) = E[v * (A v)]`` for Rademacher probes. Both only need
the products of :mod:`fippure.curvature.products`.

For the GGN there is a cheaper form that needs forward-mode products only:
``v^T G v = (1/n) sum_i u_i^T H_z,i u_i`` with ``u = J v`` (one jvp through the logits) and
``H_z = diag(p) - p p^T``, so ``u^T H_z u = sum_k p_k (u_k - sum_j p_j u_j)^2``, the variance of
``u`` under ``p`` (this is ``||H_z^{1/2} J v||^2`` without a square root; it is computed
centred, as written, because ``sum_k p_k u_k^2 - (sum_k p_k u_k)^2`` cancels in float32 at
confident predictions). The empirical-Fisher analogue is
:func:`fippure.curvature.fisher.empirical_fisher_trace`.

Probes run one after the other by default (:func:`~fippure.curvature.probes.map_probes`; the
network is linearised once and shared); ``vmap_probes=True`` vectorises them, which is faster for
tiny models and many probes but compiles badly for convnets on XLA:CPU. All functions are
jit-able; operators from ``make_*_operator`` are pytrees and can be passed into a
jitted caller as ordinary arguments, e.g.
``jax.jit(hutchinson_trace, static_argnames="num_probes")(op, params, key, num_probes=8)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.curvature.probes import map_probes, rademacher_like, tree_dot, widened
from fippure.curvature.products import LogitsFn, Operator
from fippure.tree_checks import check_operator

PyTree = Any


def hutchinson_samples(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, " num_probes"]:
    """The per-probe values ``v_k^T A v_k`` of Hutchinson's estimator (Rademacher ``v_k``).

    Their mean estimates ``Tr(A)``; their standard deviation over ``sqrt(num_probes)`` is the
    estimate's standard error.

    Args:
        matvec: ``v -> A v`` on pytrees shaped like ``like``.
        like: a pytree with the parameters' structure, shapes and dtypes.
        key: random key for the probes.
        num_probes: number of probes K.
        vmap_probes: vectorise the probes with ``jax.vmap`` (see the module docstring).

    Returns:
        ``(K,)`` array.
    """

    check_operator(matvec, like, "hutchinson")

    def one(probe_key):
        probe = rademacher_like(probe_key, like)
        return tree_dot(probe, matvec(probe))

    return map_probes(one, key, num_probes, vmap_probes)


def hutchinson_trace(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, ""]:
    """Hutchinson's estimate of ``Tr(A)`` from ``num_probes`` Rademacher probes.

    Args:
        matvec: ``v -> A v`` (e.g. from :func:`~fippure.curvature.products.make_hvp_operator`).
        like: a pytree shaped like the parameters.
        key: random key for the probes.
        num_probes: number of probes.
        vmap_probes: vectorise the probes with ``jax.vmap``.

    Returns:
        The unbiased estimate (a scalar).
    """
    return jnp.mean(hutchinson_samples(matvec, like, key, num_probes, vmap_probes=vmap_probes))


def hutchinson_diagonal(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> PyTree:
    """Estimate of ``diag(A)`` as ``mean_k v_k * (A v_k)`` (Bekas et al. 2007).

    Args:
        matvec: ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key for the probes.
        num_probes: number of Rademacher probes.
        vmap_probes: vectorise the probes with ``jax.vmap``.

    Returns:
        A pytree shaped like ``like``: the unbiased diagonal estimate.
    """

    check_operator(matvec, like, "hutchinson_diagonal")

    def one(probe_key):
        probe = rademacher_like(probe_key, like)
        return jax.tree_util.tree_map(jnp.multiply, probe, matvec(probe))

    samples = map_probes(one, key, num_probes, vmap_probes)
    return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), samples)


def ggn_trace_samples(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: Any,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, " num_probes"]:
    """Per-probe values ``v^T G v`` of the GGN (true Fisher), computed with jvps only.

    ``v^T G v = (1/n) sum_i sum_k p_ik (u_ik - sum_j p_ij u_ij)^2`` (the variance of ``u_i``
    under ``p_i``) with ``u = J v`` from the forward linearisation of the logits (one primal
    pass shared by all probes).
    Differentiable with ``jax.grad``.

    Args:
        logits_fn: ``(params, batch) -> (n, K)``.
        params: where the GGN is taken.
        batch: the data ``logits_fn`` reads.
        key: random key for the Rademacher probes.
        num_probes: number of probes.
        vmap_probes: vectorise the probes with ``jax.vmap``.

    Returns:
        ``(num_probes,)`` array.
    """
    logits, jvp_fn = jax.linearize(lambda p: logits_fn(p, batch), params)
    probs = jax.nn.softmax(widened(logits), axis=-1)

    def one(probe_key):
        u = widened(jvp_fn(rademacher_like(probe_key, params)))
        # the variance of u under p, centred before squaring: E[u^2] - E[u]^2 cancels
        # catastrophically at confident predictions (0 in float32 once 1 - max p < 1e-8)
        centred = u - jnp.sum(probs * u, axis=-1, keepdims=True)
        quad = jnp.sum(probs * centred**2, axis=-1)
        return jnp.mean(quad)

    return map_probes(one, key, num_probes, vmap_probes)


def ggn_trace(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: Any,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, ""]:
    """Hutchinson's estimate of ``Tr(G)`` (GGN = true Fisher) from jvps only.

    See :func:`ggn_trace_samples`.

    Args:
        logits_fn: ``(params, batch) -> (n, K)`` logits.
        params: where the GGN is taken.
        batch: the data ``logits_fn`` reads.
        key: random key for the Rademacher probes.
        num_probes: number of probes.
        vmap_probes: vectorise the probes with ``jax.vmap``.

    Returns:
        The unbiased estimate (a scalar) of the trace of the GGN of the batch's mean
        cross-entropy.
    """
    samples = ggn_trace_samples(logits_fn, params, batch, key, num_probes, vmap_probes=vmap_probes)
    return jnp.mean(samples)
