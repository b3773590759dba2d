"""Batched prediction: padded batches give the unbatched logits, and images the model cannot
take are refused in one line."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fippure.data.catalog import get_spec
from fippure.errors import InvalidInputError, NonFiniteLossError
from fippure.inference import accuracy, predict, predict_logits
from fippure.models.registry import create_model, init_variables

SPEC = get_spec("digits")


@pytest.fixture(scope="module")
def network():
    model = create_model("small_cnn", num_classes=10, width=4)
    return model, init_variables(model, jax.random.key(0), SPEC.image_shape)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *SPEC.image_shape), dtype=np.uint8)


def test_padded_batches_give_the_logits_of_one_batch(network):
    model, variables = network
    images = _images(7)
    whole = predict_logits(model, variables, images, SPEC, batch_size=7)
    np.testing.assert_allclose(
        predict_logits(model, variables, images, SPEC, batch_size=3), whole, rtol=1e-5, atol=1e-6
    )
    # uint8 and the same images as floats in [0, 1] are the same input
    np.testing.assert_allclose(
        predict_logits(model, variables, images / 255.0, SPEC), whole, rtol=1e-5, atol=1e-5
    )
    # ...and so are the same pixels as another integer type
    np.testing.assert_allclose(
        predict_logits(model, variables, images.astype(np.int32), SPEC), whole, rtol=1e-6
    )
    labels = predict(model, variables, images, SPEC)
    assert accuracy(model, variables, images, labels, SPEC) == 1.0


def test_no_images_give_no_rows(network):
    model, variables = network
    assert predict_logits(model, variables, _images(0), SPEC).shape == (0, 10)
    assert predict(model, variables, _images(0), SPEC).shape == (0,)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((4, 32, 32, 3), np.uint8), r"expected digits images of shape \(n, 8, 8, 1\)"),
        (np.zeros((8, 8, 1), np.uint8), r"got \(8, 8, 1\)"),
        (np.full((2, 8, 8, 1), 255.0, np.float32), "float images are read as \\[0, 1\\]"),
        (np.full((2, 8, 8, 1), -1.0, np.float32), "images in \\[-1, 1\\] must be mapped"),
        (np.full((2, 8, 8, 1), 300, np.int32), "integer images .* span 300..300"),
        (np.full((2, 8, 8, 1), np.nan, np.float32), "NaN or infinite"),
        (np.ones((2, 8, 8, 1), bool), "must be uint8 or float, got dtype bool"),
        ([[[[0]]]], "must be an array"),
    ],
)
def test_images_the_model_cannot_take_are_refused(network, images, message):
    model, variables = network
    with pytest.raises(InvalidInputError, match=message):
        predict(model, variables, images, SPEC)


def test_accuracy_needs_one_label_per_image(network):
    model, variables = network
    with pytest.raises(InvalidInputError, match=r"\(3,\) labels for 5 images"):
        accuracy(model, variables, _images(5), np.zeros(3, np.int32), SPEC)
    assert np.isnan(accuracy(model, variables, _images(0), np.zeros(0, np.int32), SPEC))


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(network, batch_size):
    model, variables = network
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        predict_logits(model, variables, _images(3), SPEC, batch_size=batch_size)


def test_a_model_with_nan_weights_is_an_error_not_a_perfect_backdoor(network):
    """argmax of NaN logits is class 0, the usual target: such a model would score ASR 1."""
    model, variables = network
    broken = jax.tree_util.tree_map(lambda leaf: leaf * np.nan, variables)
    with pytest.raises(NonFiniteLossError, match="logits are NaN or infinite"):
        predict(model, broken, _images(3), SPEC)


def test_variables_of_another_model_are_refused_in_one_line(network):
    model, variables = network
    params = {**variables["params"], "conv1": {"kernel": np.zeros((3, 3, 3, 4), np.float32)}}
    rgb = {**variables, "params": params}  # a first conv for colour images
    for n in (3, 0):  # a prediction, and the shape of an empty one
        with pytest.raises(InvalidInputError, match="variables do not fit this SmallCNN") as error:
            predict_logits(model, rgb, _images(n), SPEC)
        assert "\n" not in str(error.value)


def test_another_number_of_images_in_the_same_bucket_compiles_nothing(network, programs_compiled):
    """Images are padded on the host to whole batches before their one upload, and the logits
    cut on the host: an evaluation of a set of another size (a filtered triggered set) once
    compiled about seven small programs for every new size."""
    model, variables = network
    for n in (1100, 40):  # buckets: 2 batches of 1000, and one of 64
        predict_logits(model, variables, _images(n), SPEC)
    with programs_compiled() as compiled:
        logits = [predict_logits(model, variables, _images(n, 1), SPEC) for n in (1999, 33, 57)]
    assert not compiled, compiled
    assert [len(x) for x in logits] == [1999, 33, 57]
    np.testing.assert_allclose(
        logits[1], predict_logits(model, variables, _images(33, 1), SPEC, batch_size=33), atol=1e-5
    )
