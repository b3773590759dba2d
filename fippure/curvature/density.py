"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan and Xiao, "An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density" (ICML 2019), after Lin, Saad and Yang 2016, and Golub and
Welsch 1969 for the quadrature): for a unit probe ``q`` and the Lanczos tridiagonal matrix ``T``
started from it, with eigenpairs ``(theta_j, y_j)``, the nodes ``theta_j`` and weights
``w_j = y_j[0]^2`` form a Gauss quadrature of the spectral measure ``sum_i (q^T u_i)^2
delta(t - lambda_i)``. Averaged over random probes this is, in expectation, the empirical
spectral distribution ``(1/P) sum_i delta(t - lambda_i)``. Replacing each delta by a Gaussian
of width ``sigma`` gives the smoothed density

    phi_sigma(t) = mean_probes sum_j w_j N(t; theta_j, sigma^2),

which integrates to 1 (the weights of each probe sum to 1) and whose mean is
``mean_probes q^T A q``, an unbiased estimate of ``Tr(A) / P``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.curvature.eigenvalues import Loop, lanczos
from fippure.curvature.products import Operator
from fippure.errors import InvalidInputError, is_concrete, require

PyTree = Any


class SpectralDensity(NamedTuple):
    """A smoothed spectral density and the quadrature it came from.

    Attributes:
        grid: ``(g,)`` evaluation points (ascending, evenly spaced).
        density: ``(g,)`` values of ``phi_sigma`` on the grid.
        nodes: ``(probes, m)`` Gauss quadrature nodes (Ritz values) of each probe.
        weights: ``(probes, m)`` quadrature weights; each row sums to 1.
        sigma: the Gaussian width used.
    """

    grid: Float[Array, " g"]
    density: Float[Array, " g"]
    nodes: Float[Array, "probes m"]
    weights: Float[Array, "probes m"]
    sigma: Float[Array, ""]

    def mean(self) -> Float[Array, ""]:
        """The mean of the quadrature measure, ``mean_probes sum_j w_j theta_j`` (~ Tr/P)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes, axis=-1))


def slq_quadrature(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    num_iters: int = 50,
    num_probes: int = 3,
    *,
    loop: Loop = "python",
) -> tuple[Float[Array, "probes m"], Float[Array, "probes m"]]:
    """Gauss quadrature nodes and weights from ``num_probes`` independent Lanczos runs.

    Args:
        matvec: symmetric ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key.
        num_iters: Lanczos steps per probe (``m``).
        num_probes: independent probes.
        loop: see :func:`fippure.curvature.eigenvalues.lanczos`.

    Returns:
        ``(nodes, weights)``, each ``(num_probes, m)``.
    """
    if num_probes < 1:
        raise InvalidInputError(f"num_probes must be positive, got {num_probes}")
    nodes, weights = [], []
    for probe_key in jax.random.split(key, num_probes):
        ritz, vectors = lanczos(matvec, like, probe_key, num_iters, loop=loop).eigh()
        nodes.append(ritz)
        weights.append(vectors[0] ** 2)
    return jnp.stack(nodes), jnp.stack(weights)


def gaussian_density(
    nodes: Float[Array, "probes m"],
    weights: Float[Array, "probes m"],
    grid: Float[Array, " g"],
    sigma: float | Float[Array, ""],
) -> Float[Array, " g"]:
    """``mean_probes sum_j w_j N(grid; theta_j, sigma^2)``.

    Args:
        nodes: ``(probes, m)`` quadrature nodes ``theta_j`` (Ritz values).
        weights: ``(probes, m)`` quadrature weights ``w_j``.
        grid: ``(g,)`` points at which the density is evaluated.
        sigma: the Gaussian width, positive (may be traced).

    Returns:
        The ``(g,)`` density values on ``grid``.

    Raises:
        InvalidInputError: a concrete ``sigma`` that is not positive.
    """
    if is_concrete(sigma) and not float(sigma) > 0:  # also refuses NaN
        raise InvalidInputError(f"sigma must be positive, got {sigma}")
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(weights[None] * kernel, axis=-1), axis=-1)


def spectral_density(
    matvec: Operator,
    like: PyTree,
    key: PRNGKeyArray,
    *,
    num_iters: int = 50,
    num_probes: int = 3,
    num_points: int = 1024,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    margin: float = 5.0,
    loop: Loop = "python",
) -> SpectralDensity:
    """The Gaussian-smoothed spectral density of ``A`` by stochastic Lanczos quadrature.

    Args:
        matvec: symmetric ``v -> A v``.
        like: a pytree shaped like the parameters.
        key: random key.
        num_iters: Lanczos steps per probe.
        num_probes: independent probes.
        num_points: grid size.
        sigma: Gaussian width; default ``relative_sigma`` times the spread of the nodes or
            their largest magnitude, whichever is larger (``relative_sigma`` itself when every
            node is 0, as for the Hessian of a loss that does not depend on the parameters).
        relative_sigma: see ``sigma``.
        margin: the grid spans the nodes plus ``margin * sigma`` on each side, so that the
            density integrates to 1 on it.
        loop: see :func:`fippure.curvature.eigenvalues.lanczos`.

    Returns:
        A :class:`SpectralDensity`. The grid is chosen from the nodes on the host, so this
        function cannot be jitted, differentiated or vmapped as a whole; for a density to
        differentiate, compose :func:`slq_quadrature` and :func:`gaussian_density` on a
        fixed grid (both are jit-able and differentiable).

    Raises:
        InvalidInputError: called under ``jax.jit``, ``jax.grad`` or ``jax.vmap`` (traced
            nodes), or with bad grid settings.
    """
    require(num_points >= 2, f"num_points must be at least 2, got {num_points}")
    require(relative_sigma > 0, f"relative_sigma must be positive, got {relative_sigma}")
    require(sigma is None or sigma > 0, f"sigma must be positive, got {sigma}")
    require(margin >= 0, f"margin must be non-negative, got {margin}")
    nodes, weights = slq_quadrature(matvec, like, key, num_iters, num_probes, loop=loop)
    if not is_concrete(nodes):
        raise InvalidInputError(
            "spectral_density chooses its grid on the host, so it cannot run under jax.jit, "
            "jax.grad or jax.vmap; differentiate gaussian_density(*slq_quadrature(...), grid, "
            "sigma) on a fixed grid instead"
        )
    low, high = float(jnp.min(nodes)), float(jnp.max(nodes))
    if sigma is None:
        sigma = relative_sigma * max(high - low, abs(high), abs(low))
        if not sigma >= np.finfo(nodes.dtype).tiny:  # all nodes 0 (or denormal): unit scale
            sigma = relative_sigma
    grid = jnp.linspace(low - margin * sigma, high + margin * sigma, num_points, dtype=nodes.dtype)
    sigma = jnp.asarray(sigma, nodes.dtype)
    return SpectralDensity(
        grid, gaussian_density(nodes, weights, grid, sigma), nodes, weights, sigma
    )
