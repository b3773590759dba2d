"""From uint8 arrays to normalised device batches."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.data import (
    ImageDataset,
    batch_from_permutation,
    denormalize,
    epoch_permutation,
    get_spec,
    iterate_batches,
    load_dataset,
    normalize,
    pipeline,
    to_device,
    to_unit_range,
)
from fippure.errors import InvalidInputError


def _dataset(n: int = 50) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # an id in every image
    return ImageDataset(images, rng.integers(0, 10, n).astype(np.int32), get_spec("digits"), "x")


def test_unit_range():
    x = jnp.array([0, 1, 128, 255], jnp.uint8)
    np.testing.assert_allclose(to_unit_range(x), [0.0, 1 / 255, 128 / 255, 1.0], rtol=1e-6)
    floats = jnp.array([0.25, 0.5])
    np.testing.assert_array_equal(to_unit_range(floats), floats)


@pytest.mark.parametrize("name", ["cifar10", "gtsrb", "digits"])
def test_normalize_round_trip(name):
    spec = get_spec(name)
    x = jax.random.uniform(jax.random.key(0), (4, *spec.image_shape))
    z = normalize(x, spec)
    mean, std = np.asarray(spec.mean), np.asarray(spec.std)
    np.testing.assert_allclose(z, (np.asarray(x) - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(denormalize(z, spec), x, atol=1e-6)


def test_cifar10_normalisation_is_the_specs():
    # SPEC section 1's constants (a swapped mean and std went unnoticed without CIFAR data)
    spec = get_spec("cifar10")
    assert spec.mean == (0.4914, 0.4822, 0.4465)
    assert spec.std == (0.2470, 0.2435, 0.2616)


def test_epoch_permutation_is_a_pure_function_of_key_and_epoch():
    key = jax.random.key(0)
    p0 = np.asarray(epoch_permutation(key, 0, 100))
    np.testing.assert_array_equal(np.sort(p0), np.arange(100))
    np.testing.assert_array_equal(p0, epoch_permutation(key, 0, 100))
    assert not np.array_equal(p0, epoch_permutation(key, 1, 100))


def test_batch_from_permutation():
    data = _dataset(20)
    perm = jnp.asarray(np.random.default_rng(1).permutation(20))
    step = jax.jit(batch_from_permutation, static_argnums=4)
    x, y, rows = step(jnp.asarray(data.images), jnp.asarray(data.labels), perm, 2, 6)
    np.testing.assert_array_equal(rows, perm[12:18])
    np.testing.assert_array_equal(x, data.images[np.asarray(perm[12:18])])
    np.testing.assert_array_equal(y, data.labels[np.asarray(perm[12:18])])


@pytest.mark.parametrize(
    ("index", "batch_size", "message"),
    [(3, 6, "batch index 3 is out of range"), (-1, 6, "batch index -1"), (0, 21, "batch_size")],
)
def test_batch_from_permutation_refuses_a_batch_past_the_epoch(index, batch_size, message):
    """20 examples make 3 full batches of 6: a 4th would silently repeat the 3rd."""
    data = _dataset(20)
    with pytest.raises(InvalidInputError, match=message):
        batch_from_permutation(data.images, data.labels, jnp.arange(20), index, batch_size)


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize(
    ("batch_size", "drop", "sizes", "n"),
    [
        (16, False, [16, 16, 16, 2], 50),
        (16, True, [16] * 3, 50),
        (50, False, [50], 50),
        (16, True, [16] * 3, 48),  # a count the batch size divides: no batch dropped
    ],
)
def test_iterate_batches(monkeypatch, on_device, batch_size, drop, sizes, n):
    data = _dataset(n)
    if not on_device:  # force the host-streaming path
        monkeypatch.setattr(pipeline, "fits_on_device", lambda dataset, limit=0: False)
    batches = list(iterate_batches(data, batch_size, key=jax.random.key(0), drop_remainder=drop))
    assert [len(y) for _, y in batches] == sizes
    ids = np.concatenate([np.asarray(x[:, 0, 0, 0]) for x, _ in batches])
    assert len(set(ids.tolist())) == len(ids)  # no example twice
    if not drop or n % batch_size == 0:
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))
        assert not np.array_equal(ids, np.arange(n))  # shuffled
    for x, y in batches:  # labels travel with their images
        np.testing.assert_array_equal(y, data.labels[np.asarray(x[:, 0, 0, 0])])


def test_iterate_batches_unshuffled_from_device_dataset():
    data = _dataset(10)
    batches = list(iterate_batches(to_device(data), 4))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), data.images)


def test_image_dataset_validation():
    spec = get_spec("digits")
    with pytest.raises(InvalidInputError, match="uint8 NHWC"):
        ImageDataset(np.zeros((2, 8, 8, 1), np.float32), np.zeros(2, np.int32), spec, "x")
    with pytest.raises(InvalidInputError, match=r"must be \(8, 8, 1\)"):
        ImageDataset(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32), spec, "x")
    with pytest.raises(InvalidInputError, match="labels of shape"):
        ImageDataset(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(3, np.int32), spec, "x")
    data = _dataset(10)
    sub = data.subset(np.array([3, 1]), "sub")
    assert len(sub) == 2 and sub.split == "sub"
    np.testing.assert_array_equal(sub.labels, data.labels[[3, 1]])


def test_normalize_refuses_integer_pixels_and_another_datasets_shape():
    cifar, digits = get_spec("cifar10"), get_spec("digits")
    with pytest.raises(InvalidInputError, match="to_unit_range first"):
        normalize(jnp.zeros((2, 32, 32, 3), jnp.uint8), cifar)  # mean and std became 0
    with pytest.raises(InvalidInputError, match=r"do not end in cifar10's \(32, 32, 3\)"):
        normalize(jnp.zeros((2, 32, 32, 1)), cifar)  # broadcast to 3 channels before
    with pytest.raises(InvalidInputError, match="denormalize"):
        denormalize(jnp.zeros((2, 8, 8, 3)), digits)


def test_an_image_dataset_refuses_labels_outside_the_classes_and_plain_lists():
    spec = get_spec("digits")
    images = np.zeros((2, 8, 8, 1), np.uint8)
    for labels in ([0, 10], [-1, 3]):
        with pytest.raises(InvalidInputError, match=r"digits labels must lie in \[0, 10\)"):
            ImageDataset(images, np.array(labels, np.int32), spec, "x")
    with pytest.raises(InvalidInputError, match="must be NumPy arrays, got ndarray and list"):
        ImageDataset(images, [0, 1], spec, "x")


@pytest.mark.parametrize("batch_size", [0, -32, 2.5, True])
def test_iterate_batches_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    # 0 was range()'s ValueError and -32 yielded no batches at all
    data = load_dataset("digits", "test")
    with pytest.raises(InvalidInputError, match="batch_size must be a positive integer"):
        next(iterate_batches(data, batch_size))


@pytest.mark.parametrize("on_device", [True, False])
def test_both_paths_yield_int32_labels_even_with_float64_enabled(monkeypatch, on_device):
    """The streamed path casts its labels as the on-device one does (to_device): int64 labels
    with jax_enable_x64 on once reached the step as int64 when streamed only."""
    data = _dataset(10)
    data = dataclasses.replace(data, labels=data.labels.astype(np.int64))
    if not on_device:
        monkeypatch.setattr(pipeline, "fits_on_device", lambda dataset, limit=0: False)
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        batches = list(iterate_batches(data, 4))
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert {str(y.dtype) for _, y in batches} == {"int32"}
