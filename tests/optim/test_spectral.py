"""Spectral shifts: zero shifts reproduce kernels and logits; counts for PreAct-ResNet-18."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.errors import InvalidInputError
from fippure.models import create_model, init_variables
from fippure.optim import spectral


@pytest.fixture(scope="module")
def resnet():
    model = create_model("preact_resnet18", 10, width=16)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    return model, variables


def test_counts_for_preact_resnet18_width16(resnet):
    _, variables = resnet
    factors = spectral.decompose(variables["params"])
    counts = spectral.shift_counts(factors)
    # stem (27, 16) -> 16; stage s has 4 convs of 16 * 2^(s-1) outputs (r = out) and, from
    # stage 2 on, a 1x1 shortcut with r = its input channels; head (128, 10) -> 10.
    assert counts["stem/kernel"] == 16
    assert counts["stage2_block1/shortcut/kernel"] == 16
    assert counts["stage4_block2/conv2/kernel"] == 128
    assert counts["head/kernel"] == 10
    assert len(counts) == 1 + 16 + 3 + 1
    assert spectral.num_shifts(factors) == 16 + 64 + (128 + 16) + (256 + 32) + (512 + 64) + 10
    assert spectral.num_shifts(factors) == 1098


def test_zero_shifts_reproduce_kernels_and_logits(resnet):
    model, variables = resnet
    params = variables["params"]
    factors = spectral.decompose(params)
    shifts = spectral.init_shifts(factors)
    rebuilt = jax.jit(spectral.rebuild_params)(params, factors, shifts)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(rebuilt)[0],
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), err_msg=str(path))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits = model.apply(variables, images)
    again = model.apply({**variables, "params": rebuilt}, images)
    np.testing.assert_allclose(again, logits, rtol=1e-4, atol=1e-4)


def test_layout_and_shift_semantics():
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
    factors = spectral.decompose({"conv": {"kernel": kernel}})
    factor = factors["conv"]["kernel"]
    assert factor.u.shape == (36, 5) and factor.vt.shape == (5, 5)
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(kernel).reshape(36, 5), compute_uv=False), factor.s, rtol=1e-5
    )
    # Shifting the top singular value by d raises the spectral norm by d...
    shift = jnp.zeros(5).at[0].set(1.5)
    bigger = spectral.rebuild_kernel(factor, shift).reshape(36, 5)
    np.testing.assert_allclose(np.linalg.norm(bigger, 2), factor.s[0] + 1.5, rtol=1e-5)
    # ...and relu(s + d) removes a direction when d < -s.
    cut = spectral.rebuild_kernel(factor, jnp.zeros(5).at[-1].set(-1e3)).reshape(36, 5)
    assert np.linalg.matrix_rank(np.asarray(cut), tol=1e-4) == 4
    # Shifts are trainable: gradients flow to them.
    grads = jax.grad(lambda d: jnp.sum(spectral.rebuild_kernel(factor, d) ** 2))(jnp.zeros(5))
    np.testing.assert_allclose(grads, 2 * factor.s, rtol=1e-4)


def test_pattern_selects_kernels(resnet):
    _, variables = resnet
    factors = spectral.decompose(variables["params"], pattern=r"^head/")
    assert list(spectral.shift_counts(factors)) == ["head/kernel"]
    with pytest.raises(InvalidInputError, match="no kernel"):
        spectral.decompose(variables["params"], pattern="nothing")
