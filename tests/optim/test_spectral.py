"""Spectral shifts: zero shifts reproduce kernels and logits; counts for PreAct-ResNet-18; the
factored layer form equals the rebuilt kernels."""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
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
    apply = jax.jit(model.apply)  # one program, not one per operation
    logits = apply(variables, images)
    again = apply({**variables, "params": rebuilt}, images)
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
    # the message lists this model's kernel paths, the ones a pattern is matched against
    listed = "this model's kernels: head/kernel, stage1_block1/conv1/kernel"
    with pytest.raises(InvalidInputError, match=f"no kernel.*{listed}"):
        spectral.decompose(variables["params"], pattern="nothing")


def _random_shifts(factors, key, scale=0.3):
    """Shifts of a few tenths of each singular value, some of them cutting a direction."""
    leaves, treedef = jax.tree_util.tree_flatten(spectral.init_shifts(factors))
    keys = jax.random.split(key, len(leaves))
    values = [
        scale * jax.random.normal(k, leaf.shape, leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, values)


def _both_forms(model, variables, factors, shifts, images, train):
    """``(rebuilt, factored)`` outputs of the network at ``shifts``."""
    rebuilt = {**variables, "params": spectral.rebuild_params(variables["params"], factors, shifts)}
    kwargs = {"train": True, "mutable": ["batch_stats"]} if train else {}
    dense = model.apply(rebuilt, images, **kwargs)
    with spectral.factored(factors, shifts):
        low_rank = model.apply(rebuilt, images, **kwargs)
    return dense, low_rank


@pytest.mark.parametrize("train", [False, True])
def test_factored_form_equals_the_rebuilt_kernels(resnet, train):
    """((x * U) * relu(s + d)) V^T is the layer with W(d): logits and re-estimated BN stats.
    The biases are made non-zero (they start at 0, which hid a factored layer that dropped its
    bias)."""
    model, variables = resnet
    flat = flax.traverse_util.flatten_dict(variables["params"])
    keys = jax.random.split(jax.random.key(5), len(flat))
    flat = {
        path: 0.1 * jax.random.normal(k, leaf.shape) if path[-1] == "bias" else leaf
        for k, (path, leaf) in zip(keys, flat.items(), strict=True)
    }
    assert any(path[-1] == "bias" for path in flat)
    variables = {**variables, "params": flax.traverse_util.unflatten_dict(flat)}
    factors = spectral.decompose(variables["params"])
    shifts = _random_shifts(factors, jax.random.key(3))
    images = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    dense, low_rank = jax.jit(lambda d: _both_forms(model, variables, factors, d, images, train))(
        shifts
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(dense), jax.tree_util.tree_leaves(low_rank), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4)


def test_factored_form_skips_the_kernels(resnet):
    """Under jit no rebuilt kernel is computed: the factored program has no (m, out) product
    of U and V^T, so it is smaller than the rebuilt one."""
    model, variables = resnet
    factors = spectral.decompose(variables["params"])
    images = jnp.zeros((1, 32, 32, 3))

    def logits(d, form):
        rebuilt = {**variables, "params": spectral.rebuild_params(variables["params"], factors, d)}
        if form == "rebuilt":
            return model.apply(rebuilt, images)
        with spectral.factored(factors, d):
            return model.apply(rebuilt, images)

    shifts = spectral.init_shifts(factors)

    def flops(form):
        grad = jax.jit(jax.grad(lambda d: jnp.sum(logits(d, form))))
        return grad.lower(shifts).compile().cost_analysis()["flops"]

    assert flops("factored") < 0.8 * flops("rebuilt")


class _Mixed(nn.Module):
    """A plain conv and dense (factored) beside a grouped conv and a DenseGeneral (not)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv")(x))
        x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x))
        x = nn.DenseGeneral((2, 3), name="general")(x.reshape(x.shape[0], -1))
        return nn.Dense(5, name="head")(x.reshape(x.shape[0], -1))


def test_factored_form_gradients_and_tangents_match_dense_in_float64(x64):
    """Reverse and forward derivatives in d agree with the rebuilt network (float64); layers
    that cannot run factored fall back to their rebuilt kernels."""
    model = _Mixed()
    images = jax.random.normal(jax.random.key(5), (2, 8, 8, 3), jnp.float64)
    variables = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float64), model.init(jax.random.key(6), images)
    )
    factors = spectral.decompose(variables["params"])
    assert set(spectral.shift_counts(factors)) == {
        "conv/kernel",
        "grouped/kernel",
        "general/kernel",
        "head/kernel",
    }

    def loss(d, form):
        params = spectral.rebuild_params(variables["params"], factors, d)
        if form == "rebuilt":
            return jnp.sum(jnp.sin(model.apply({"params": params}, images)))
        with spectral.factored(factors, d):
            return jnp.sum(jnp.sin(model.apply({"params": params}, images)))

    shifts = _random_shifts(factors, jax.random.key(7), scale=0.1)
    probe = _random_shifts(factors, jax.random.key(8), scale=1.0)
    for derivative in (
        lambda form, d: loss(d, form),
        lambda form, d: jax.grad(loss)(d, form),
        lambda form, d: jax.jvp(lambda e: loss(e, form), (d,), (probe,))[1],
    ):
        derivative = jax.jit(derivative, static_argnums=0)  # one program, not one per operation
        for a, b in zip(
            jax.tree_util.tree_leaves(derivative("rebuilt", shifts)),
            jax.tree_util.tree_leaves(derivative("factored", shifts)),
            strict=True,
        ):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def test_factored_form_needs_every_shift(resnet):
    _, variables = resnet
    factors = spectral.decompose(variables["params"])
    shifts = spectral.init_shifts(factors)
    del shifts["head"]
    with pytest.raises(InvalidInputError, match="no spectral shift .*head/kernel"):
        with spectral.factored(factors, shifts):
            pass


def test_factored_block_outside_a_transform_is_refused(resnet):
    """A block entered around jax.grad (or a jitted call) would ignore the traced shifts: the
    gradient would silently be zero. It is refused instead."""
    model, variables = resnet
    factors = spectral.decompose(variables["params"])
    shifts = spectral.init_shifts(factors)
    images = jnp.zeros((1, 32, 32, 3))

    def total(d):
        params = spectral.rebuild_params(variables["params"], factors, d)
        return jnp.sum(model.apply({**variables, "params": params}, images))

    with pytest.raises(InvalidInputError, match="inside the transformed function"):
        with spectral.factored(factors, shifts):
            jax.grad(total)(shifts)


def test_factored_form_of_a_1d_convolution(x64):
    """``nn.Conv`` with an integer kernel size on (batch, length, channels) inputs."""

    class Conv1D(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(6, kernel_size=3, name="conv")(x)

    model = Conv1D()
    x = jax.random.normal(jax.random.key(9), (2, 10, 4), jnp.float64)
    variables = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float64), model.init(jax.random.key(10), x)
    )
    factors = spectral.decompose(variables["params"])
    shifts = _random_shifts(factors, jax.random.key(11), scale=0.1)
    params = spectral.rebuild_params(variables["params"], factors, shifts)
    with spectral.factored(factors, shifts):
        low_rank = model.apply({"params": params}, x)
    np.testing.assert_allclose(low_rank, model.apply({"params": params}, x), rtol=1e-10)


def test_shifts_and_factors_are_checked(resnet):
    _, variables = resnet
    factors = spectral.decompose(variables["params"])
    shifts = spectral.init_shifts(factors)
    shifts["head"]["kernel"] = jnp.zeros(1)
    for use in (
        lambda: spectral.rebuild_params(variables["params"], factors, shifts),
        lambda: spectral.factored(factors, shifts).__enter__(),
    ):
        with pytest.raises(InvalidInputError, match="shift of head/kernel has shape"):
            use()
    with pytest.raises(InvalidInputError, match="spectral.decompose"):
        spectral.init_shifts(variables["params"])
    other = create_model("preact_resnet18", 10, width=8)
    other_params = init_variables(other, jax.random.key(0), (32, 32, 3))["params"]
    with pytest.raises(InvalidInputError, match="decompose these params instead"):
        spectral.rebuild_params(other_params, factors, spectral.init_shifts(factors))


def test_bfloat16_kernels_are_decomposed_in_float32_and_keep_their_dtype():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 8)).astype(jnp.bfloat16)
    factors = spectral.decompose({"conv": {"kernel": kernel}})
    factor = factors["conv"]["kernel"]
    assert factor.u.dtype == factor.s.dtype == factor.vt.dtype == jnp.bfloat16
    rebuilt = (factor.u.astype(jnp.float32) * factor.s.astype(jnp.float32)) @ factor.vt.astype(
        jnp.float32
    )
    np.testing.assert_allclose(
        rebuilt, spectral.as_matrix(kernel).astype(jnp.float32), rtol=0.05, atol=0.05
    )


def test_attention_kernels_are_decomposed_as_their_layers_maps():
    """A query/key/value kernel ``(in, heads, head_dim)`` maps ``in`` to ``heads * head_dim``,
    the output projection ``(heads, head_dim, out)`` maps ``heads * head_dim`` to ``out``:
    the model tells which (the shapes alone do not), and the singular values are the maps'."""
    model = create_model("vit_small", 10, width=8, depth=1, num_heads=2, patch_size=4)
    variables = init_variables(model, jax.random.key(0), (8, 8, 3))
    axes = spectral.layer_input_axes(model, variables, (8, 8, 3))
    attention = {k.rsplit("/", 2)[-2]: v for k, v in axes.items()}
    assert attention == {"query": 1, "key": 1, "value": 1, "out": 2}
    factors = spectral.decompose(variables["params"], input_axes=axes)
    for path, n_in in axes.items():
        kernel = functools.reduce(dict.get, path.split("/"), variables["params"])
        factor = functools.reduce(dict.get, path.split("/"), factors)
        matrix = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1)
        np.testing.assert_allclose(factor.s, np.linalg.svd(matrix, compute_uv=False), rtol=1e-5)
        assert factor.s.shape == (min(matrix.shape),)
        rebuilt = spectral.rebuild_kernel(factor, jnp.zeros_like(factor.s))
        np.testing.assert_allclose(rebuilt, kernel, atol=1e-6)
