"""Mixed precision: every classifier computes in its ``dtype`` field and keeps float32 weights.

A model built with ``dtype="bfloat16"`` (or ``"float16"``) runs its convolutions, matmuls and
normalisations in that dtype, while its parameters and BatchNorm statistics, and the logits
and features it returns, stay float32 (Micikevicius et al., "Mixed Precision Training", 2018).
The parameters do not depend on the dtype, so one checkpoint serves every dtype.
"""

from __future__ import annotations

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.cli import build_parser
from fippure.errors import InvalidInputError
from fippure.models import (
    ComputeDtype,
    activations,
    create_model,
    forward,
    init_variables,
    penultimate_features,
    with_dtype,
)
from fippure.models.generators import ConvAutoencoder
from fippure.models.registry import FEATURES

# (name, small kwargs, input shape)
CASES = [
    ("preact_resnet18", {"width": 8}, (32, 32, 3)),
    ("vgg11_bn", {"width": 8}, (32, 32, 3)),
    ("vgg16_bn", {"width": 8}, (32, 32, 3)),
    ("vit_small", {"width": 32, "depth": 2, "num_heads": 2}, (32, 32, 3)),
    ("small_cnn", {"width": 8}, (8, 8, 1)),
]
IDS = [case[0] for case in CASES]


def _pair(name, dtype):
    _, kwargs, shape = CASES[IDS.index(name)]
    full = create_model(name, 10, **kwargs)
    reduced = create_model(name, 10, dtype=dtype, **kwargs)
    inputs = jax.random.normal(jax.random.key(1), (4, *shape))
    return full, reduced, init_variables(full, jax.random.key(0), shape), inputs


def _dtypes(tree) -> set[str]:
    return {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(tree)}


#: bfloat16 on every model; float16 (the same code path) on the two that compile fastest
PAIRS = [(name, "bfloat16") for name in IDS] + [
    ("small_cnn", "float16"),
    ("vit_small", "float16"),
]


@pytest.mark.parametrize(("name", "dtype"), PAIRS)
def test_layers_compute_in_the_dtype_on_the_same_float32_weights(name, dtype):
    full, reduced, variables, inputs = _pair(name, dtype)
    _, _, shape = CASES[IDS.index(name)]
    mixed = init_variables(reduced, jax.random.key(0), shape)
    assert _dtypes(mixed) == {"float32"}  # the dtype does not change the parameters
    jax.tree_util.tree_map(np.testing.assert_array_equal, mixed, variables)

    @jax.jit  # one compilation for the three applications
    def apply(v, x):
        logits, acts = activations(reduced, v, x)
        return logits, acts, penultimate_features(reduced, v, x), full.apply(v, x)

    logits, acts, features, expected = apply(variables, inputs)
    layers = {k: a for k, a in acts.items() if k != FEATURES}
    assert layers and {str(a.dtype) for a in layers.values()} == {dtype}
    assert acts[FEATURES].dtype == jnp.float32  # the sown penultimate features, as the head's
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    # the same function up to rounding (bfloat16 keeps 8 significant bits)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(logits, expected, atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize("name", ["preact_resnet18", "vit_small"])
def test_train_mode_keeps_float32_statistics_and_gradients(name):
    _, reduced, variables, inputs = _pair(name, "bfloat16")
    labels = jnp.arange(inputs.shape[0]) % 10

    def loss(params):
        logits, updated = forward(reduced, {**variables, "params": params}, inputs, train=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), updated

    (value, updated), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
    assert _dtypes(grads) == {"float32"} and _dtypes(updated) == {"float32"}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    if "batch_stats" in variables:  # the running averages moved, in float32
        moved = jax.tree_util.tree_map(
            lambda a, b: bool(jnp.any(a != b)), updated["batch_stats"], variables["batch_stats"]
        )
        assert any(jax.tree_util.tree_leaves(moved))


def test_the_default_follows_the_inputs_and_parameters():
    model = create_model("small_cnn", 10, width=4)
    assert model.dtype is None
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    _, acts = jax.jit(lambda v, x: activations(model, v, x))(variables, jnp.ones((2, 8, 8, 1)))
    assert {str(a.dtype) for a in acts.values()} == {"float32"}


def test_with_dtype_switches_a_model_and_keeps_its_weights():
    full, _, variables, inputs = _pair("small_cnn", "bfloat16")
    switched = with_dtype(full, "bfloat16")
    assert switched.dtype == "bfloat16" and full.dtype is None
    assert with_dtype(full, None) is full
    built = create_model("small_cnn", 10, width=8, dtype="bfloat16")
    np.testing.assert_array_equal(
        jax.jit(switched.apply)(variables, inputs), jax.jit(built.apply)(variables, inputs)
    )


def test_an_unknown_dtype_is_a_one_line_error():
    with pytest.raises(InvalidInputError, match=r"dtype must be one of .*'float8'") as error:
        create_model("small_cnn", 10, dtype="float8")
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        with_dtype(create_model("small_cnn", 10), "int8")
    with pytest.raises(InvalidInputError, match="ConvAutoencoder has no dtype field"):
        with_dtype(ConvAutoencoder(3), "bfloat16")


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--out", "x"],
        ["attack", "--attack", "badnets", "--out", "x"],
        ["purify", "--checkpoint", "c", "--defense", "ft", "--out", "x"],
    ],
    ids=lambda c: c[0],
)
def test_the_cli_takes_every_model_dtype_and_no_other(command, capsys):
    for dtype in typing.get_args(ComputeDtype):
        assert build_parser().parse_args([*command, "--dtype", dtype]).dtype == dtype
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_with_dtype_keeps_the_other_fields():
    switched = with_dtype(create_model("vgg11_bn", 10, width=8), "float16")
    assert isinstance(switched, nn.Module)
    assert (switched.width, switched.depth, switched.dtype) == (8, 11, "float16")
