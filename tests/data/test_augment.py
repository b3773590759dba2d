"""On-device augmentation: random crop of the zero-padded image, and horizontal flip."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.data import DATASETS, augment, get_spec, random_crop, random_flip
from fippure.errors import InvalidInputError


def _coordinate_images(batch: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """Images whose pixel values encode (row, column, channel); all values are nonzero."""
    rows, cols, chans = np.meshgrid(
        np.arange(height), np.arange(width), np.arange(channels), indexing="ij"
    )
    image = 1 + rows * 1000 + cols * 10 + chans
    return np.broadcast_to(image, (batch, height, width, channels)).astype(np.float32)


def _crop_offsets(out: np.ndarray, image: np.ndarray, pad: int) -> list[tuple[int, int]]:
    """For every output, the offsets (dy, dx) whose window of the padded image it equals."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    found = []
    for crop in out:
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(crop, padded[dy : dy + h, dx : dx + w])
        ]
        assert len(matches) == 1, "output is not a window of the padded image"
        found.append(matches[0])
    return found


@pytest.mark.parametrize(("height", "width", "pad"), [(32, 32, 4), (8, 8, 1), (6, 10, 2)])
def test_crop_is_a_window_of_the_padded_image(height, width, pad):
    images = _coordinate_images(64, height, width)
    out = np.asarray(jax.jit(random_crop, static_argnums=2)(jax.random.key(0), images, pad))
    assert out.shape == images.shape
    offsets = _crop_offsets(out, images[0], pad)
    assert all(0 <= dy <= 2 * pad and 0 <= dx <= 2 * pad for dy, dx in offsets)
    assert len(set(offsets)) > 1  # the offsets vary across the batch


def test_crop_offsets_cover_the_whole_range():
    pad, n = 2, 1024
    images = _coordinate_images(n, 6, 6, 1)
    out = np.asarray(random_crop(jax.random.key(1), images, pad))
    offsets = _crop_offsets(out, images[0], pad)
    counts = np.zeros((2 * pad + 1, 2 * pad + 1))
    for dy, dx in offsets:
        counts[dy, dx] += 1
    assert counts.min() > 0  # every one of the 25 offsets occurs, the extremes included
    # Roughly uniform: each offset ~ n / 25 = 41 times.
    assert counts.max() < 3 * n / counts.size


def test_zero_padding_is_identity():
    images = _coordinate_images(4, 8, 8)
    np.testing.assert_array_equal(random_crop(jax.random.key(0), images, 0), images)


def test_flip_is_mirror_or_identity():
    images = _coordinate_images(1000, 5, 7)
    out = np.asarray(jax.jit(random_flip)(jax.random.key(2), images))
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert np.all(mirrored ^ same)
    assert 0.4 < mirrored.mean() < 0.6


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_flip_only_where_the_dataset_allows_it(name):
    spec = get_spec(name)
    assert spec.flip == (name in ("cifar10", "cifar100"))
    images = _coordinate_images(256, 6, 6)
    run = jax.jit(functools.partial(augment, padding=0, flip=spec.flip))
    out = np.asarray(run(jax.random.key(3), images))
    if spec.flip:
        assert not np.array_equal(out, images)
    else:  # no crop and no flip: the images pass through unchanged
        np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_augment_shapes_and_bounds(name):
    spec = get_spec(name)
    h, w, c = spec.image_shape
    images = jax.random.uniform(jax.random.key(0), (8, h, w, c))
    out = jax.jit(augment, static_argnums=(2, 3))(
        jax.random.key(1), images, spec.crop_padding, spec.flip
    )
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= float(images.max())


def test_augment_is_deterministic_in_the_key():
    images = _coordinate_images(16, 8, 8)
    a = augment(jax.random.key(5), images, 2, True)
    b = augment(jax.random.key(5), images, 2, True)
    c = augment(jax.random.key(6), images, 2, True)
    np.testing.assert_array_equal(a, b)
    assert not jnp.array_equal(a, c)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda key, image: random_crop(key, image, 1), "batch of images"),
        (lambda key, image: random_flip(key, image), "batch of images"),
        (lambda key, image: augment(key, image, 1, True), "batch of images"),
        (lambda key, image: random_crop(key, image[None], -1), "non-negative integer"),
    ],
    ids=["crop_one_image", "flip_one_image", "augment_one_image", "negative_padding"],
)
def test_a_single_image_or_a_negative_padding_gets_a_one_line_error(call, message):
    # were an unpacking ValueError and an error from inside jnp.pad
    with pytest.raises(InvalidInputError, match=message):
        call(jax.random.PRNGKey(0), jnp.zeros((8, 8, 1)))
