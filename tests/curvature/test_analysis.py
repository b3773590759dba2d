"""``analyze_curvature``: its report against dense float64 curvature on a tiny BatchNorm model,
and a second checkpoint of the same architecture analysed without compiling again."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fippure.curvature.analysis import AnalysisConfig, analyze_curvature

CONFIG = AnalysisConfig(
    hutchinson_probes=40, power_iters=500, power_tol=1e-10, lanczos_iters=40,
    slq_probes=1, top_k=3,
)  # fmt: skip


def test_the_report_is_the_dense_curvature_in_float64(bn_classifier, dense_classifier):
    model, variables, inputs, labels = bn_classifier
    report, _ = analyze_curvature(model, variables, inputs, labels, jax.random.key(0), CONFIG)
    dense = dense_classifier(*bn_classifier)
    eigenvalues = np.sort(np.linalg.eigvalsh(dense.hessian))[::-1]
    assert report["num_params"] == dense.hessian.shape[0]
    assert report["lambda_max"] == pytest.approx(eigenvalues[0], rel=1e-6)
    np.testing.assert_allclose(report["top_eigenvalues"], eigenvalues[:3], rtol=1e-6)
    assert report["trace_empirical_fisher"] == pytest.approx(
        np.trace(dense.empirical_fisher), rel=1e-10
    )
    # Hutchinson is unbiased: the dense trace lies within a few standard errors of its estimate
    trace = np.trace(dense.hessian)
    assert abs(report["trace_hessian"] - trace) < 4 * report["trace_hessian_stderr"], trace


def test_a_second_checkpoint_of_the_same_model_reuses_the_compiled_analysis(
    bn_classifier, dense_classifier, programs_compiled
):
    """Before and after a defense: the second analysis compiles nothing (the exact Fisher pass
    included) and reads the new weights."""
    model, before, inputs, labels = bn_classifier
    after = {**before, "params": jax.tree_util.tree_map(lambda p: 0.9 * p, before["params"])}
    config = AnalysisConfig(
        hutchinson_probes=4, power_iters=500, power_tol=1e-10, lanczos_iters=8, slq_probes=1
    )
    first, _ = analyze_curvature(model, before, inputs, labels, jax.random.key(0), config)
    with programs_compiled() as compiled:
        second, _ = analyze_curvature(model, after, inputs, labels, jax.random.key(0), config)
    assert not compiled, compiled
    hessian = dense_classifier(model, after, inputs, labels).hessian
    assert second["lambda_max"] == pytest.approx(np.linalg.eigvalsh(hessian)[-1], rel=1e-6)
    assert second["lambda_max"] != pytest.approx(first["lambda_max"], rel=1e-3)


def test_a_probe_count_off_the_chunk_compiles_no_second_program_and_keeps_its_probes(
    bn_classifier, programs_compiled
):
    """Five probes in chunks of two run three chunks of two and drop the surplus; the fifth
    probe is the one a chunk of one would have drawn, so the estimate is unchanged."""
    from fippure.curvature.analysis import _chunked_samples
    from fippure.curvature.trace import hutchinson_samples

    matrix = jax.random.normal(jax.random.key(1), (6, 6), jax.numpy.float64)
    matrix = matrix + matrix.T
    sizes = []

    def samples(key, size):
        sizes.append(size)
        return hutchinson_samples(lambda v: matrix @ v, jax.numpy.zeros(6), key, size)

    key = jax.random.key(2)
    chunked = _chunked_samples(samples, key, 5, 2)
    assert sizes == [2, 2, 2]
    fifth = hutchinson_samples(
        lambda v: matrix @ v, jax.numpy.zeros(6), jax.random.fold_in(key, 4), 1
    )
    np.testing.assert_array_equal(chunked[4:], fifth)

    model, variables, inputs, labels = bn_classifier
    config = AnalysisConfig(
        hutchinson_probes=6, power_iters=5, lanczos_iters=4, slq_probes=1, top_k=2
    )
    analyze_curvature(model, variables, inputs, labels, jax.random.key(0), config)
    odd = dataclasses.replace(config, hutchinson_probes=5)
    with programs_compiled() as compiled:
        analyze_curvature(model, variables, inputs, labels, jax.random.key(0), odd)
    assert not compiled, compiled


def test_a_model_without_a_train_keyword_is_refused_in_one_line():
    import flax.linen as nn
    import jax.numpy as jnp

    from fippure.errors import InvalidInputError

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    variables = Plain().init(jax.random.key(0), x)
    with pytest.raises(InvalidInputError, match="Plain.__call__ takes no train keyword"):
        analyze_curvature(Plain(), variables, x, y, jax.random.key(1))
