"""Every registry model: shapes, BatchNorm state, features and activations, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.errors import FippureError, InvalidInputError, UnknownNameError
from fippure.models import (
    MODELS,
    activations,
    count_params,
    create_model,
    forward,
    init_variables,
    model_fields,
    output_shape,
    penultimate_features,
)
from fippure.models.vgg import VGG

# (name, small kwargs, input shape, penultimate width, has BatchNorm)
CASES = [
    ("preact_resnet18", {"width": 16}, (32, 32, 3), 128, True),
    ("vgg11_bn", {"width": 16}, (32, 32, 3), 128, True),
    ("vgg16_bn", {"width": 8}, (32, 32, 3), 64, True),
    ("vit_small", {"width": 32, "depth": 2, "num_heads": 2}, (32, 32, 3), 32, False),
    ("small_cnn", {"width": 8}, (8, 8, 1), 16, True),
]
IDS = [case[0] for case in CASES]


def test_every_registry_model_is_covered():
    assert sorted(MODELS) == sorted(IDS)


@functools.cache
def _build(name: str):
    _, kwargs, shape, feature_dim, has_bn = CASES[IDS.index(name)]
    model = create_model(name, num_classes=7, **kwargs)
    variables = init_variables(model, jax.random.key(0), shape)
    inputs = jax.random.normal(jax.random.key(1), (3, *shape)) * 2.0 + 0.5
    return model, variables, inputs, feature_dim, has_bn


def _eval_logits(model, variables, inputs):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, inputs)


@pytest.fixture(params=IDS)
def built(request):
    return _build(request.param)


def test_output_shape(built):
    model, variables, inputs, _, has_bn = built
    assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
    logits = _eval_logits(model, variables, inputs)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert "head" in variables["params"]
    assert variables["params"]["head"]["kernel"].shape[-1] == 7


def test_batch_stats_change_only_in_train_mode(built):
    model, variables, inputs, _, has_bn = built
    logits, same = forward(model, variables, inputs, train=False)
    assert same is variables
    logits_train, updated = jax.jit(lambda v, x: forward(model, v, x, train=True))(
        variables, inputs
    )
    assert logits_train.shape == logits.shape
    jax.tree_util.tree_map(np.testing.assert_array_equal, updated["params"], variables["params"])
    if has_bn:
        changed = jax.tree_util.tree_map(
            lambda a, b: not np.allclose(a, b), updated["batch_stats"], variables["batch_stats"]
        )
        assert all(jax.tree_util.tree_leaves(changed))  # every running mean and variance moved
        # Train mode normalises with batch statistics, so its logits differ from eval mode's.
        assert not np.allclose(logits_train, logits)
    else:
        np.testing.assert_allclose(logits_train, logits, rtol=1e-5, atol=1e-5)


def test_penultimate_features(built):
    model, variables, inputs, feature_dim, _ = built
    features = jax.jit(lambda v, x: penultimate_features(model, v, x))(variables, inputs)
    assert features.shape == (3, feature_dim)
    head = variables["params"]["head"]
    logits = _eval_logits(model, variables, inputs)
    np.testing.assert_allclose(
        features @ head["kernel"] + head["bias"], logits, rtol=1e-4, atol=1e-4
    )


def test_activations(built):
    model, variables, inputs, _, has_bn = built
    logits, acts = jax.jit(lambda v, x: activations(model, v, x))(variables, inputs)
    np.testing.assert_allclose(logits, _eval_logits(model, variables, inputs), atol=1e-5)
    assert "head" in acts
    np.testing.assert_allclose(acts["head"], logits, atol=1e-6)
    assert all(a.shape[0] == 3 for a in acts.values())
    if has_bn:
        assert any(k.split("/")[-1].startswith("bn") for k in acts)


def test_preact_resnet_layers():
    model, variables, inputs, _, _ = _build("preact_resnet18")
    _, acts = jax.jit(lambda v, x: activations(model, v, x))(variables, inputs[:2])
    assert acts["stem"].shape == (2, 32, 32, 16)
    assert acts["stage1_block1/conv1"].shape == (2, 32, 32, 16)
    assert acts["stage4_block2/conv2"].shape == (2, 4, 4, 128)
    assert acts["stage2_block1/shortcut"].shape == (2, 16, 16, 32)
    assert acts["bn_final"].shape == (2, 4, 4, 128)
    # 0.70M parameters at width 16 (SPEC section 1), 11.17M at the papers' width 64.
    assert count_params(variables["params"]) - 7 * 129 == 701_018 - 10 * 129
    big = jax.eval_shape(
        lambda: init_variables(
            create_model("preact_resnet18", 10, width=64), jax.random.key(0), (32, 32, 3)
        )
    )
    assert count_params(big["params"]) == 11_172_170


def test_models_accept_digits_inputs():
    x = jnp.ones((2, 8, 8, 1))
    for name, kwargs in [
        ("vgg11_bn", {"width": 8}),
        ("vit_small", {"width": 16, "depth": 1, "num_heads": 2}),
    ]:
        model = create_model(name, 10, **kwargs)
        logits = jax.eval_shape(lambda m=model: m.apply(m.init(jax.random.key(0), x), x))
        assert logits.shape == (2, 10)


def test_unknown_model():
    with pytest.raises(UnknownNameError) as error:
        create_model("preact_resnet", 10)
    message = str(error.value)
    assert message.startswith("unknown model 'preact_resnet'; known: preact_resnet18, ")
    assert "Did you mean 'preact_resnet18'?" in message
    assert isinstance(error.value, FippureError)
    with pytest.raises(UnknownNameError, match="unknown model 'vgg'"):
        model_fields("vgg")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("preact_resnet18", {"depth": 3}, r"preact_resnet18 takes no argument\(s\) \['depth'\]"),
        ("small_cnn", {"patch_size": 2}, r"it takes \['dtype', 'width'\]"),
        ("vgg11_bn", {"depth": 16}, r"takes no argument\(s\) \['depth'\]"),
        ("small_cnn", {"width": 0}, "small_cnn: width must be >= 1, got 0"),
        ("vit_small", {"depth": -1}, "vit_small: depth must be >= 1, got -1"),
        ("vit_small", {"width": 16}, "vit width 16 is not divisible by num_heads 3"),
        ("small_cnn", {"width": 2.5}, "small_cnn: width must be an integer, got 2.5"),
        ("small_cnn", {"width": "16"}, "small_cnn: width must be an integer, got '16'"),
        ("preact_resnet18", {"width": True}, "width must be an integer, got True"),
    ],
)
def test_bad_model_argument(name, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        create_model(name, 10, **kwargs)


def test_too_few_classes_and_none_kwargs():
    with pytest.raises(InvalidInputError, match="num_classes must be an integer >= 2, got 1"):
        create_model("small_cnn", 1)
    with pytest.raises(InvalidInputError, match="num_classes must be an integer >= 2, got 2.7"):
        create_model("small_cnn", 2.7)
    assert create_model("small_cnn", 10, width=None).width == 16  # None means default


def test_model_fields():
    assert model_fields("preact_resnet18") == {"num_classes", "width", "dtype"}
    assert "depth" not in model_fields("vgg16_bn")
    assert {"width", "depth", "num_heads", "patch_size", "mlp_ratio"} <= model_fields("vit_small")


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8, 1), (8, 0, 1), (8.0, 8, 1)])
def test_init_variables_needs_height_width_channels(shape):
    model = create_model("small_cnn", 10, width=4)
    with pytest.raises(InvalidInputError, match=r"image_shape must be \(height, width, channels\)"):
        init_variables(model, jax.random.key(0), shape)


def test_vgg_depth_is_11_or_16():
    with pytest.raises(InvalidInputError, match=r"vgg depth must be one of \[11, 16\], got 13"):
        VGG(depth=13)


def test_a_vit_patch_must_divide_the_image():
    """A patch that does not tile the image would be zero-padded into an extra row of patches."""
    model = create_model("vit_small", 10, width=16, depth=1, num_heads=2, patch_size=3)
    with pytest.raises(InvalidInputError, match="vit patch_size 3 does not divide the 8x8 images"):
        jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (8, 8, 1)))


def test_variables_of_another_model_are_a_one_line_error():
    model = create_model("small_cnn", 10, width=4)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (8, 8, 1)))
    assert output_shape(model, variables, (8, 8, 1)) == (10,)
    rgb = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (8, 8, 3)))
    no_stats = {"params": variables["params"]}
    for wrong, match in [
        (rgb, r"For parameter \"kernel\" in \"/conv1\".*\(3, 3, 3, 4\)"),
        (no_stats, 'Tried to access "mean" from collection "batch_stats"'),
    ]:
        with pytest.raises(InvalidInputError, match="do not fit this SmallCNN: " + match) as error:
            output_shape(model, wrong, (8, 8, 1))
        assert "\n" not in str(error.value) and "https" not in str(error.value)


@pytest.mark.parametrize("apply", [forward, penultimate_features, activations])
def test_the_apply_helpers_refuse_variables_of_another_model_in_one_line(apply):
    model = create_model("small_cnn", 10, width=4)
    rgb = init_variables(model, jax.random.key(0), (8, 8, 3))
    images = jnp.zeros((2, 8, 8, 1))
    with pytest.raises(InvalidInputError, match="do not fit this SmallCNN") as error:
        apply(model, rgb, images, train=False)
    assert "\n" not in str(error.value)


class _Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return 2 * x, 3 * x

    def halve(self, x):
        return x / 2


class _SharedLayers(nn.Module):
    """A dense layer applied twice (shared weights), a tuple output and a method call."""

    @nn.compact
    def __call__(self, x, train=False):
        dense, pair = nn.Dense(3, name="dense"), _Pair(name="pair")
        hidden = dense(dense(x))
        double, triple = pair(hidden)
        return double + triple + pair.halve(hidden)


def test_activations_keeps_every_call_part_and_method():
    """A second call of a shared layer, the parts of a tuple output and a chosen method are
    each kept under their own key; none overwrites another."""
    model = _SharedLayers()
    x = jnp.arange(6.0).reshape(2, 3)
    variables = model.init(jax.random.key(0), x)
    _, acts = activations(model, variables, x, select=lambda module, method: True)
    kernel, bias = variables["params"]["dense"]["kernel"], variables["params"]["dense"]["bias"]
    first = x @ kernel + bias
    second = first @ kernel + bias
    np.testing.assert_allclose(acts["dense#0"], first, rtol=1e-6)
    np.testing.assert_allclose(acts["dense#1"], second, rtol=1e-6)
    np.testing.assert_allclose(acts["pair[0]"], 2 * second, rtol=1e-6)
    np.testing.assert_allclose(acts["pair[1]"], 3 * second, rtol=1e-6)
    np.testing.assert_allclose(acts["pair.halve"], second / 2, rtol=1e-6)
    # the model's own output is the logits, returned first
    assert set(acts) == {"dense#0", "dense#1", "pair[0]", "pair[1]", "pair.halve"}
