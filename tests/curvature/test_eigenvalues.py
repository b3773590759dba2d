"""Lanczos, power iteration and stochastic Lanczos quadrature against dense eigensolvers."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads
from jax.tree_util import Partial

from fippure.curvature import density, eigenvalues, products, trace
from fippure.curvature.analysis import AnalysisConfig, lambda_max_warnings
from fippure.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("x64")


def operator(problem, kind):
    if kind == "hessian":
        return jax.jit(products.make_hvp_operator, static_argnums=0)(
            problem.loss_fn, problem.params, problem.batch
        )
    return jax.jit(products.make_ggn_operator, static_argnums=0)(
        problem.logits_fn, problem.params, problem.batch
    )


def _apply_matrix(matrix, v):
    flat, unravel = ravel_pytree(v)
    return unravel(matrix @ flat)


def matrix_operator(matrix):
    """``v -> A v`` for a dense ``A`` on any pytree of its size (a pytree operator)."""
    return Partial(_apply_matrix, jnp.asarray(matrix))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("loop", ["python", "fori"])
def test_full_lanczos_top_eigenvalues_equal_eigvalsh(problem, dense, kind, loop):
    matrix = getattr(dense, kind)
    size = matrix.shape[0]
    # The GGN has rank <= n (K - 1) < P, so full Lanczos exhausts the Krylov space and must
    # restart (beta = 0) to stay accurate.
    top = eigenvalues.top_eigenvalues(
        operator(problem, kind), problem.params, jax.random.key(0), k=5, num_iters=size, loop=loop
    )
    expected = np.linalg.eigvalsh(matrix)[::-1][:5]
    np.testing.assert_allclose(top, expected, rtol=1e-8, atol=1e-10 * abs(expected[0]))


def test_python_and_fori_loops_agree(problem):
    op = operator(problem, "hessian")
    runs = [
        eigenvalues.lanczos(op, problem.params, jax.random.key(1), 8, loop=loop)
        for loop in ("python", "fori")
    ]
    np.testing.assert_allclose(runs[0].alphas, runs[1].alphas, rtol=1e-10)
    np.testing.assert_allclose(runs[0].betas, runs[1].betas, rtol=1e-10)


def test_lanczos_is_jittable_with_python_loop(problem, dense):
    op = operator(problem, "ggn")
    tri = jax.jit(
        lambda o, p, k: eigenvalues.lanczos(o, p, k, 6, loop="python"), static_argnums=()
    )(op, problem.params, jax.random.key(2))
    eager = eigenvalues.lanczos(op, problem.params, jax.random.key(2), 6)
    np.testing.assert_allclose(tri.alphas, eager.alphas, rtol=1e-10)


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_gradient_of_the_lanczos_top_eigenvalue_is_the_dense_one(problem, loop):
    flat, unravel = ravel_pytree(problem.params)

    def dense_top(params):
        hessian = jax.hessian(lambda f: problem.loss_fn(unravel(f), problem.batch))(
            ravel_pytree(params)[0]
        )
        return jnp.linalg.eigvalsh(hessian)[-1]

    def lanczos_top(params, loop):
        op = products.make_hvp_operator(problem.loss_fn, params, problem.batch)
        top = eigenvalues.top_eigenvalues(op, params, jax.random.key(0), 1, flat.size, loop=loop)
        return top[0]

    expected = ravel_pytree(jax.jit(jax.grad(dense_top))(problem.params))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "donated buffers were not usable"
        gradient = ravel_pytree(jax.grad(lanczos_top)(problem.params, loop))[0]
    np.testing.assert_allclose(gradient, expected, rtol=1e-8, atol=1e-10 * abs(expected).max())


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_slq_quadrature_gradient_matches_finite_differences(problem, loop):
    def second_moment(params):
        op = products.make_hvp_operator(problem.loss_fn, params, problem.batch)
        nodes, weights = density.slq_quadrature(op, params, jax.random.key(7), 4, 2, loop=loop)
        return jnp.sum(weights * nodes**2)  # = sum over probes of ||H q||^2

    check_grads(second_moment, (problem.params,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_python_loop_lanczos_vmaps_like_a_loop_over_parameters(problem):
    points = [problem.params, jax.tree_util.tree_map(lambda x: 1.1 * x, problem.params)]
    key = jax.random.key(3)

    def run(params):
        op = products.make_hvp_operator(problem.loss_fn, params, problem.batch)
        return eigenvalues.lanczos(op, params, key, 5)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "donated buffers were not usable"
        batched = jax.vmap(run)(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *points))
    for i, params in enumerate(points):
        single = run(params)
        np.testing.assert_allclose(batched.alphas[i], single.alphas, rtol=1e-10)
        np.testing.assert_allclose(batched.betas[i], single.betas, rtol=1e-10)


def test_lanczos_takes_shape_dtype_structs_as_like(problem):
    op = operator(problem, "hessian")
    shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), problem.params
    )
    from_shapes = eigenvalues.lanczos(op, shapes, jax.random.key(4), 5)
    from_params = eigenvalues.lanczos(op, problem.params, jax.random.key(4), 5)
    np.testing.assert_array_equal(from_shapes.alphas, from_params.alphas)
    np.testing.assert_array_equal(from_shapes.betas, from_params.betas)


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_lanczos_with_as_many_steps_as_dimensions_finds_every_eigenvalue(x64, loop):
    """num_iters = P builds the whole P x P tridiagonal: its Ritz values are the spectrum,
    the bottom of it included (the top-eigenvalue tests converge in fewer steps)."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    spectrum = np.array([5.0, 3.0, 2.0, 1.0, -1.0, -4.0])
    op = matrix_operator(q @ np.diag(spectrum) @ q.T)
    t = eigenvalues.lanczos(op, {"w": jnp.zeros(6)}, jax.random.key(0), 6, loop=loop)
    assert t.alphas.shape == (6,)
    np.testing.assert_allclose(np.sort(t.eigh()[0]), np.sort(spectrum), atol=1e-10)


def test_few_lanczos_steps_find_a_separated_top_eigenvalue(x64):
    rng = np.random.default_rng(0)
    size = 200
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    spectrum = np.concatenate([[50.0, 20.0], rng.uniform(-1, 1, size - 2)])
    like = {"a": jnp.zeros((10, 10)), "b": jnp.zeros(100)}
    op = matrix_operator(q @ np.diag(spectrum) @ q.T)
    top = eigenvalues.top_eigenvalues(op, like, jax.random.key(0), k=2, num_iters=20)
    np.testing.assert_allclose(top, [50.0, 20.0], rtol=1e-8)
    result = eigenvalues.power_iteration(op, like, jax.random.key(0), num_iters=500, tol=1e-13)
    np.testing.assert_allclose(result.eigenvalue, 50.0, rtol=1e-9)
    assert int(result.num_iters) < 500  # stopped on the tolerance
    vector = ravel_pytree(result.eigenvector)[0]
    np.testing.assert_allclose(abs(float(vector @ q[:, 0])), 1.0, rtol=1e-6)
    fori = eigenvalues.power_iteration(op, like, jax.random.key(0), 500, 1e-13, loop="fori")
    np.testing.assert_allclose(fori.eigenvalue, 50.0, rtol=1e-9)


def test_power_iteration_under_jit_takes_the_same_steps_as_the_eager_loop(x64):
    """Traced, the ``"python"`` loop runs its ``num_iters`` steps in one ``lax.scan``, the
    same iterates as the eager loop without its stopping test (``tol=0``)."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    matrix = q @ np.diag([3.0, 2.5, 1.0, -0.5, 0.2, 0.1]) @ q.T
    like = {"w": jnp.zeros(6)}

    def run(m):
        return eigenvalues.power_iteration(matrix_operator(m), like, jax.random.key(2), 40, 0.0)

    eager, traced = run(matrix), jax.jit(run)(matrix)
    assert int(eager.num_iters) == int(traced.num_iters) == 40
    np.testing.assert_allclose(traced.eigenvalue, eager.eigenvalue, rtol=1e-13)
    # a difference of nearly equal quotients: equal to rounding, not to relative precision
    np.testing.assert_allclose(traced.relative_change, eager.relative_change, atol=1e-13)
    np.testing.assert_allclose(traced.eigenvector["w"], eager.eigenvector["w"], atol=1e-13)


def test_power_iteration_on_a_network_ggn(problem, dense):
    result = eigenvalues.power_iteration(
        operator(problem, "ggn"), problem.params, jax.random.key(3), num_iters=3000, tol=1e-12
    )
    expected = np.linalg.eigvalsh(dense.ggn)[-1]
    np.testing.assert_allclose(result.eigenvalue, expected, rtol=1e-6)


def test_slq_density_integrates_to_one_and_has_mean_trace_over_p(problem, dense):
    matrix = dense.ggn
    size = matrix.shape[0]
    num_probes = 300
    result = density.spectral_density(
        operator(problem, "ggn"),
        problem.params,
        jax.random.key(5),
        num_iters=4,
        num_probes=num_probes,
    )
    grid, values = np.asarray(result.grid), np.asarray(result.density)
    np.testing.assert_allclose(np.trapezoid(values, grid), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.sum(result.weights, axis=-1), 1.0, rtol=1e-10)
    # Smoothing keeps the mean: the density's first moment equals the quadrature's.
    np.testing.assert_allclose(np.trapezoid(grid * values, grid), result.mean(), rtol=1e-5)
    # The quadrature mean is the mean of q^T A q over unit Rademacher probes: Tr(A) / P.
    off = matrix - np.diag(np.diag(matrix))
    error = np.sqrt(2 * np.sum(off**2) / num_probes) / size
    assert abs(float(result.mean()) - np.trace(matrix) / size) <= 4 * error
    assert error < 0.2 * abs(np.trace(matrix) / size)


def test_full_slq_nodes_are_eigenvalues(problem, dense):
    matrix = dense.ggn
    eigenvalues = np.linalg.eigvalsh(matrix)
    nodes, weights = density.slq_quadrature(
        operator(problem, "ggn"), problem.params, jax.random.key(6), matrix.shape[0], 2
    )
    heavy = np.asarray(nodes)[np.asarray(weights) > 1e-6]
    gaps = np.min(np.abs(heavy[:, None] - eigenvalues[None]), axis=1)
    np.testing.assert_array_less(gaps, 1e-8 * np.abs(eigenvalues).max())


def test_power_iteration_gradient_python_loop_and_forward_mode_fori(x64):
    # d lambda_max(B + s C) / ds = v^T C v for the top eigenvector v of B (a simple eigenvalue).
    rng = np.random.default_rng(1)
    size = 30
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    base = q @ np.diag(np.concatenate([[10.0, 2.0], rng.uniform(-1, 1, size - 2)])) @ q.T
    direction = rng.normal(size=(size, size))
    direction = (direction + direction.T) / 2
    like = {"a": jnp.zeros((5, 4)), "b": jnp.zeros(10)}

    def top(scale, loop):
        op = matrix_operator(base + scale * direction)
        return eigenvalues.power_iteration(op, like, jax.random.key(0), 60, 0.0, loop=loop)[0]

    expected = q[:, 0] @ direction @ q[:, 0]
    np.testing.assert_allclose(jax.grad(top)(0.0, "python"), expected, rtol=1e-9)
    _, forward = jax.jvp(lambda s: top(s, "fori"), (0.0,), (1.0,))
    np.testing.assert_allclose(forward, expected, rtol=1e-9)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda op, p, key: eigenvalues.lanczos(op, p, key, 0), "num_iters must be positive"),
        (lambda op, p, key: eigenvalues.top_eigenvalues(op, p, key, k=0), "k must be positive"),
        (
            lambda op, p, key: eigenvalues.top_eigenvalues(op, p, key, k=5, num_iters=3),
            "num_iters must be at least k = 5, got 3",
        ),
        (
            lambda op, p, key: eigenvalues.top_eigenvalues(op, p, key, k=1000, num_iters=1000),
            "k must be at most the number of parameters",
        ),
        (
            lambda op, p, key: eigenvalues.power_iteration(op, p, key, num_iters=0),
            "num_iters must be positive",
        ),
        (
            lambda op, p, key: density.slq_quadrature(op, p, key, num_probes=0),
            "num_probes must be positive",
        ),
    ],
    ids=["lanczos", "top_k", "top_k_iters", "top_k_dim", "power", "slq"],
)
def test_bad_counts_raise_one_line_errors(problem, call, message):
    with pytest.raises(InvalidInputError, match=message) as error:
        call(operator(problem, "hessian"), problem.params, jax.random.key(0))
    assert "\n" not in str(error.value)


def _first_leaf_reshaped(params):
    """``params`` with its first leaf given a trailing axis of size 1 (a ``(C, 1)`` bias)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves[0] = leaves[0][..., None]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize(
    "call",
    [
        lambda op, like, key: eigenvalues.lanczos(op, like, key, 4),
        lambda op, like, key: eigenvalues.power_iteration(op, like, key, 4),
        lambda op, like, key: trace.hutchinson_trace(op, like, key, 2),
        lambda op, like, key: trace.hutchinson_diagonal(op, like, key, 2),
    ],
    ids=["lanczos", "power", "hutchinson", "hutchinson_diagonal"],
)
def test_an_operator_built_for_other_parameters_is_refused_in_one_line(problem, call):
    op = operator(problem, "ggn")
    wrong = [_first_leaf_reshaped(problem.params), {"only": jnp.zeros(3)}]
    for like in wrong:
        with pytest.raises(InvalidInputError, match="does not accept a vector shaped") as error:
            call(op, like, jax.random.key(0))
        assert "\n" not in str(error.value)


def test_an_operator_that_changes_the_vectors_shape_is_refused(problem):
    with pytest.raises(InvalidInputError, match="the operator's output"):
        eigenvalues.lanczos(_first_leaf_reshaped, problem.params, jax.random.key(0), 3)


def test_power_iteration_returns_the_vector_its_rayleigh_quotient_belongs_to(x64):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    matrix = q @ np.diag(np.linspace(-1.0, 3.0, 12)) @ q.T
    like = {"w": jnp.zeros(12)}
    for loop in ("python", "fori"):
        result = eigenvalues.power_iteration(
            matrix_operator(matrix), like, jax.random.key(0), 5, 0.0, loop=loop
        )
        v = np.asarray(result.eigenvector["w"])
        np.testing.assert_allclose(result.eigenvalue, v @ matrix @ v, rtol=1e-12)


@pytest.mark.parametrize(
    "spectrum",
    [[3.0, 1.0, -0.5, 0.2], [2.0, -5.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5], [-4.0, -1.0, -3.0]],
    ids=["positive_dominant", "negative_dominant", "plus_minus", "all_negative"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_largest_eigenvalue_is_the_algebraic_maximum_of_an_indefinite_matrix(x64, spectrum, jit):
    # Power iteration alone returns the eigenvalue of largest *magnitude*: -5 for the second
    # spectrum, and for +-2 a Rayleigh quotient that is no eigenvalue at all.
    rng = np.random.default_rng(len(spectrum))
    size = len(spectrum)
    q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    matrix = q @ np.diag(spectrum) @ q.T
    like = {"w": jnp.zeros(size)}

    def top(m):
        return eigenvalues.largest_eigenvalue(
            matrix_operator(m), like, jax.random.key(1), num_iters=2000, tol=1e-13
        )

    result = jax.jit(top)(matrix) if jit else top(matrix)
    np.testing.assert_allclose(result.eigenvalue, max(spectrum), rtol=1e-6)
    v = np.asarray(result.eigenvector["w"])
    np.testing.assert_allclose(matrix @ v, max(spectrum) * v, atol=1e-4)


def test_lanczos_runs_in_float32_for_bfloat16_parameters(problem, dense):
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), problem.params)
    hessian = jnp.asarray(dense.hessian, jnp.float32)

    def op(v):
        flat, unravel = ravel_pytree(v)
        return unravel((hessian @ flat.astype(jnp.float32)).astype(jnp.bfloat16))

    top = eigenvalues.top_eigenvalues(op, params, jax.random.key(0), k=1, num_iters=30)
    assert top.dtype == jnp.float32
    np.testing.assert_allclose(top[0], np.linalg.eigvalsh(dense.hessian)[-1], rtol=0.05)


def test_spectral_density_refuses_a_non_positive_width(problem):
    for sigma in (0.0, -1.0):
        with pytest.raises(InvalidInputError, match="sigma must be positive"):
            density.spectral_density(
                operator(problem, "ggn"), problem.params, jax.random.key(0), sigma=sigma
            )


def test_density_of_a_zero_operator_is_finite_and_a_zero_width_is_refused(x64):
    like = {"w": jnp.zeros(6)}
    zero = lambda v: jax.tree_util.tree_map(jnp.zeros_like, v)
    result = density.spectral_density(zero, like, jax.random.key(0), num_iters=4, num_probes=1)
    assert np.all(np.isfinite(result.density)) and float(result.sigma) > 0
    spacing = float(result.grid[1] - result.grid[0])
    np.testing.assert_allclose(np.sum(result.density) * spacing, 1.0, rtol=1e-3)
    with pytest.raises(InvalidInputError, match="sigma must be positive"):
        density.gaussian_density(jnp.zeros((1, 2)), jnp.full((1, 2), 0.5), jnp.zeros(3), 0.0)


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_shifted_power_iteration_does_not_claim_convergence_it_has_not_reached(x64, loop):
    # lambda_max = 1 next to a dominant -100: the run on A + rho I (rho ~ 100) converges slowly.
    # Its stopping test must be relative to lambda (~1), not to lambda + rho (~101), under
    # which it once stopped after 8 steps at 0.73 with a "relative change" of 3e-6.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    matrix = q @ np.diag(np.concatenate([[-100.0], np.linspace(0.5, 1.0, 29)])) @ q.T
    result = eigenvalues.largest_eigenvalue(
        matrix_operator(matrix), {"w": jnp.zeros(30)}, jax.random.key(0), 200, 1e-4, loop=loop
    )
    converged = float(result.relative_change) < 1e-4
    assert not converged or abs(float(result.eigenvalue) - 1.0) < 0.05
    assert int(result.num_iters) > 100


def test_lambda_max_warnings_name_an_unconverged_or_disputed_estimate():
    config = AnalysisConfig(power_tol=1e-3)
    good = {"lambda_max": 109.8, "lambda_max_power_iters": 12, "lambda_max_lanczos": 109.2,
            "lambda_max_relative_change": 1e-4, "lambda_max_disagreement": 0.006}  # fmt: skip
    assert lambda_max_warnings(good, config) == []
    bad = {**good, "lambda_max": 0.91, "lambda_max_relative_change": 0.74,
           "lambda_max_disagreement": 0.99}  # fmt: skip
    first, second = lambda_max_warnings(bad, config)
    assert "did not converge in 12 operator products (power iteration, 50 steps per run" in first
    assert "differ by 99%" in second


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_lanczos_takes_the_librarys_operators_at_bfloat16_parameters(problem, dense, kind):
    # the float32 basis once reached an operator linearised at bfloat16: JAX refused it
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), problem.params)
    batch = (problem.batch[0].astype(jnp.bfloat16), problem.batch[1])
    low = problem._replace(params=params, batch=batch)
    top = eigenvalues.top_eigenvalues(
        operator(low, kind), params, jax.random.key(0), k=1, num_iters=30
    )
    assert top.dtype == jnp.float32
    matrix = dense.hessian if kind == "hessian" else dense.ggn
    np.testing.assert_allclose(top[0], np.linalg.eigvalsh(matrix)[-1], rtol=0.1)


@pytest.mark.parametrize("loop", ["python", "fori"])
@pytest.mark.parametrize("method", ["power_iteration", "largest_eigenvalue"])
def test_power_iteration_takes_parameters_of_mixed_dtypes(problem, dense, method, loop):
    # normalising the start vector by a float32 norm turned its bfloat16 leaves into float32
    # ones, which an operator linearised at bfloat16 parameters refuses
    leaves, tree = jax.tree_util.tree_flatten(problem.params)
    mixed = [x.astype(jnp.bfloat16 if i % 2 else jnp.float32) for i, x in enumerate(leaves)]
    params = jax.tree_util.tree_unflatten(tree, mixed)
    low = problem._replace(
        params=params, batch=(problem.batch[0].astype(jnp.float32), problem.batch[1])
    )
    result = getattr(eigenvalues, method)(
        operator(low, "ggn"), params, jax.random.key(0), 200, 1e-4, loop=loop
    )
    assert result.eigenvalue.dtype == jnp.float32
    assert jax.tree_util.tree_map(lambda x: x.dtype, result.eigenvector) == jax.tree_util.tree_map(
        lambda x: x.dtype, params
    )
    np.testing.assert_allclose(result.eigenvalue, np.linalg.eigvalsh(dense.ggn)[-1], rtol=0.05)


def _closure_and_partial(problem):
    """The same Hessian operator as a plain closure and as one of the library's operators."""
    closure = lambda q: lambda v: products.hvp(problem.loss_fn, q, problem.batch, v)  # noqa: E731
    built = lambda q: products.make_hvp_operator(problem.loss_fn, q, problem.batch)  # noqa: E731
    return closure, built


@pytest.mark.parametrize(
    "estimate",
    [
        lambda op, q: eigenvalues.power_iteration(op, q, jax.random.key(0), 15).eigenvalue,
        lambda op, q: eigenvalues.largest_eigenvalue(op, q, jax.random.key(0), 15).eigenvalue,
        lambda op, q: eigenvalues.lanczos(op, q, jax.random.key(0), 4).alphas.sum(),
    ],
    ids=["power_iteration", "largest_eigenvalue", "lanczos"],
)
def test_a_plain_closure_operator_works_under_grad_and_vmap(problem, estimate):
    # a closure hides the tracers it captures: power iteration read a traced stopping test
    # and Lanczos donated buffers that autodiff still needed ("Array has been deleted")
    closure, built = _closure_and_partial(problem)
    for transform in (jax.grad, lambda f: jax.vmap(f)):
        params = problem.params
        if transform is not jax.grad:
            params = jax.tree_util.tree_map(lambda x: jnp.stack([x, 1.1 * x]), params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "donated buffers were not usable"
            got = transform(lambda q: estimate(closure(q), q))(params)
        want = transform(lambda q: estimate(built(q), q))(params)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10), got, want
        )


def test_power_iteration_of_a_zero_operator_is_zero_also_under_jit(x64):
    # the traced loop divided 0 by 0 and carried the NaN to its end
    like = {"w": jnp.ones(5)}
    zero = Partial(lambda v: jax.tree_util.tree_map(jnp.zeros_like, v))
    for function in (eigenvalues.power_iteration, eigenvalues.largest_eigenvalue):
        for run in (function, jax.jit(function, static_argnums=(3,))):
            result = run(zero, like, jax.random.key(0), 10)
            assert float(result.eigenvalue) == 0.0
            assert np.all(np.isfinite(result.eigenvector["w"]))


def test_lambda_max_of_a_vanishing_operator_has_a_finite_gradient(x64):
    """lambda_max(s A) at s = 0 (a curvature term whose weight is 0): the shift radius
    ||A v|| had the square root's infinite derivative at 0, and the gradient was NaN. At
    s = 1 the gradient is A's largest eigenvalue."""
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (6, 6), jnp.float64))[0]
    matrix = (q * jnp.array([-3.0, -1.0, 0.2, 0.5, 1.0, 2.0])) @ q.T
    like = {"w": jnp.zeros(6)}

    def lambda_max(s):
        scaled = lambda v: {"w": s * (matrix @ v["w"])}  # noqa: E731
        return eigenvalues.largest_eigenvalue(scaled, like, jax.random.key(0), 30, 0.0).eigenvalue

    assert np.isfinite(float(jax.grad(lambda_max)(0.0)))
    assert np.isfinite(float(jax.jit(jax.grad(lambda_max))(0.0)))
    assert float(jax.grad(lambda_max)(1.0)) == pytest.approx(2.0, rel=1e-4)


def test_spectral_density_under_a_transform_says_what_to_differentiate(problem):
    """Its grid is chosen on the host; the refusal names the differentiable composition."""

    def total_density(scale):
        scaled = lambda v: jax.tree_util.tree_map(lambda a: scale * a, v)  # noqa: E731
        return density.spectral_density(scaled, problem.params, jax.random.key(0)).density.sum()

    for transform in (jax.grad, jax.jit):
        with pytest.raises(InvalidInputError, match=r"gaussian_density\(\*slq_quadrature"):
            transform(total_density)(1.0)


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_gradients_through_an_exact_lanczos_breakdown_are_finite(x64, loop):
    # A = s I: the Krylov space is exhausted after one step, the norm of a zero residual
    # had an infinite derivative, and the gradient was NaN
    like = {"w": jnp.zeros(8)}

    def top(s):
        scaled = Partial(lambda s, v: jax.tree_util.tree_map(lambda x: s * x, v), s)
        return eigenvalues.top_eigenvalues(scaled, like, jax.random.key(0), 1, 3, loop=loop)[0]

    np.testing.assert_allclose(jax.grad(top)(jnp.asarray(2.0)), 1.0, rtol=1e-12)


def test_the_fori_loop_compiles_once_for_every_iteration_count_and_tolerance():
    """num_iters and tol only enter the while_loop's condition: traced, other values reuse the
    compiled loop (a sweep compiled it again for each), and each still bounds the loop."""
    matrix = jnp.diag(jnp.array([4.0, 3.0, 1.0]))

    def operator(v):
        return matrix @ v

    like, key = jnp.zeros(3), jax.random.key(0)
    eigenvalues.power_iteration(operator, like, key, 30, 1e-4, loop="fori")
    compiled = eigenvalues._power_fori._cache_size()
    few = eigenvalues.power_iteration(operator, like, key, 3, 1e-4, loop="fori")
    tight = eigenvalues.power_iteration(operator, like, key, 31, 0.0, loop="fori")
    assert eigenvalues._power_fori._cache_size() == compiled
    assert int(few.num_iters) == 3 and int(tight.num_iters) == 31
