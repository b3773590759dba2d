"""``analyze_curvature``: its report against dense float64 curvature on a tiny BatchNorm model,
and a second checkpoint of the same architecture analysed without compiling again."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fippure.curvature.analysis import AnalysisConfig, analyze_curvature

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class TinyBNNet(nn.Module):
    """conv3x3 -> BatchNorm -> tanh -> mean pool -> dense, with the library's ``train`` flag."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(3, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Dense(3, name="head")(jnp.tanh(x).mean(axis=(1, 2)))


def _problem(seed: int):
    k = jax.random.split(jax.random.key(seed), 5)
    model = TinyBNNet()
    inputs = jax.random.normal(k[0], (6, 4, 4, 2), jnp.float64)
    variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), model.init(k[1], inputs))
    variables["batch_stats"] = {
        "bn": {
            "mean": 0.1 * jax.random.normal(k[2], (3,), jnp.float64),
            "var": 0.5 + jax.random.uniform(k[3], (3,), jnp.float64),
        }
    }
    labels = jax.random.randint(k[4], (6,), 0, 3)
    return model, variables, inputs, labels


def _dense(model, variables, inputs, labels):
    flat, unravel = ravel_pytree(variables["params"])

    def losses(f):
        logits = model.apply({**variables, "params": unravel(f)}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    hessian = np.asarray(jax.hessian(lambda f: jnp.mean(losses(f)))(flat))
    per_example = np.asarray(jax.jacfwd(losses)(flat))
    return hessian, per_example.T @ per_example / len(labels)


CONFIG = AnalysisConfig(
    hutchinson_probes=40, power_iters=500, power_tol=1e-10, lanczos_iters=40,
    slq_probes=1, top_k=3,
)  # fmt: skip


def test_the_report_is_the_dense_curvature_in_float64(x64):
    model, variables, inputs, labels = _problem(0)
    report, _ = analyze_curvature(model, variables, inputs, labels, jax.random.key(0), CONFIG)
    hessian, empirical_fisher = _dense(model, variables, inputs, labels)
    eigenvalues = np.sort(np.linalg.eigvalsh(hessian))[::-1]
    assert report["num_params"] == hessian.shape[0]
    assert report["lambda_max"] == pytest.approx(eigenvalues[0], rel=1e-6)
    np.testing.assert_allclose(report["top_eigenvalues"], eigenvalues[:3], rtol=1e-6)
    assert report["trace_empirical_fisher"] == pytest.approx(np.trace(empirical_fisher), rel=1e-10)
    # Hutchinson is unbiased: the dense trace lies within a few standard errors of its estimate
    error = abs(report["trace_hessian"] - np.trace(hessian))
    assert error < 4 * report["trace_hessian_stderr"], (report["trace_hessian"], np.trace(hessian))


def test_a_second_checkpoint_of_the_same_model_reuses_the_compiled_analysis(x64):
    """Before and after a defense: the second analysis compiles at most the exact Fisher pass
    (compiled per call by ``empirical_fisher_diagonal``) and reads the new weights."""
    model, before, inputs, labels = _problem(0)
    after = {**before, "params": jax.tree_util.tree_map(lambda p: 0.9 * p, before["params"])}
    config = AnalysisConfig(
        hutchinson_probes=4, power_iters=500, power_tol=1e-10, lanczos_iters=8, slq_probes=1
    )
    first, _ = analyze_curvature(model, before, inputs, labels, jax.random.key(0), config)
    compiled = []
    listener = lambda event, duration, **kwargs: compiled.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        second, _ = analyze_curvature(model, after, inputs, labels, jax.random.key(0), config)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled.count(BACKEND_COMPILE) <= 1, compiled
    hessian, _ = _dense(model, after, inputs, labels)
    assert second["lambda_max"] == pytest.approx(np.linalg.eigvalsh(hessian)[-1], rel=1e-6)
    assert second["lambda_max"] != pytest.approx(first["lambda_max"], rel=1e-3)
