"""FTrojan and the block DCT / YCrCb helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import fft

from fippure.attacks import make_attack
from fippure.attacks.frequency import (
    block_dct,
    block_idct,
    dct_matrix,
    rgb_to_ycrcb,
    ycrcb_to_rgb,
)
from fippure.errors import InvalidInputError


def _images(n=3, shape=(32, 32, 3), seed=0, low=0.2, high=0.8):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32, low, high)


def test_dct_matrix_is_orthonormal_dct_ii():
    matrix = dct_matrix(8)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(8), atol=1e-12)
    x = np.random.default_rng(0).normal(size=8)
    np.testing.assert_allclose(matrix @ x, fft.dct(x, norm="ortho"), atol=1e-12)


@pytest.mark.parametrize("window", [4, 8, 32])
def test_block_dct_matches_scipy_per_block_and_inverts(window):
    images = _images(2)
    coefficients = np.asarray(block_dct(images, window))
    block = np.asarray(images[1, -window:, -window:, 2], np.float64)  # the last block
    np.testing.assert_allclose(
        coefficients[1, -window:, -window:, 2], fft.dctn(block, norm="ortho"), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(block_idct(jnp.asarray(coefficients), window)), np.asarray(images), atol=1e-5
    )


def test_block_dct_rejects_untiled_images():
    with pytest.raises(InvalidInputError, match="does not tile"):
        block_dct(jnp.zeros((1, 10, 10, 1)), 4)


def test_ycrcb_round_trip_and_grey_axis():
    images = _images(2)
    np.testing.assert_allclose(
        np.asarray(ycrcb_to_rgb(rgb_to_ycrcb(images))), np.asarray(images), atol=1e-6
    )
    grey = rgb_to_ycrcb(jnp.full((1, 1, 1, 3), 0.4))
    np.testing.assert_allclose(np.asarray(grey).ravel(), [0.4, 0.5, 0.5], atol=1e-6)


def test_change_is_in_the_chosen_chroma_frequencies_only():
    attack = make_attack("ftrojan")
    images = _images()  # away from 0 and 1: no clipping
    out = jax.jit(attack.trigger)({}, images, None)
    delta = np.asarray(block_dct(rgb_to_ycrcb(out), 32) - block_dct(rgb_to_ycrcb(images), 32))
    expected = np.zeros((32, 32, 3))
    expected[15, 15, 1:] = expected[31, 31, 1:] = 30 / 255
    np.testing.assert_allclose(delta, np.broadcast_to(expected, delta.shape), atol=1e-5)
    # 0.4% of the coefficients carry all of the change
    energy = np.sum(delta**2, axis=0)
    assert energy[expected > 0].sum() / energy.sum() > 0.9999


def test_image_changes_little_in_linf():
    attack = make_attack("ftrojan")
    images = _images(low=0.0, high=1.0)
    change = np.abs(np.asarray(jax.jit(attack.trigger)({}, images, None) - images))
    assert 1 / 255 < change.max() < 8 / 255
    assert change.mean() < 3 / 255


def test_grey_small_images_use_the_only_channel_and_a_smaller_window():
    attack = make_attack("ftrojan")
    window, mask = attack.layout(8, 8, 1)
    assert window == 8
    np.testing.assert_array_equal(np.argwhere(mask[..., 0]), [[3, 3], [7, 7]])
    images = _images(shape=(8, 8, 1))
    out = jax.jit(attack.trigger)({}, images, None)
    delta = np.asarray(block_dct(out, 8) - block_dct(images, 8))
    np.testing.assert_allclose(delta, 30 / 255 * np.broadcast_to(mask, delta.shape), atol=1e-5)


@pytest.mark.parametrize(
    ("frequency", "cell"), [((16, 16), (3, 3)), ((0, 3), (0, 0)), ((8, 31), (1, 7))]
)
def test_a_smaller_window_keeps_each_frequencys_band(frequency, cell):
    """Frequency f of the 32-pixel window maps to the cell (f + 1) * 8 // 32 - 1 of an 8-pixel
    window: the band of the 8 that holds it (16 -> 3, not 4)."""
    window, mask = make_attack("ftrojan", frequencies=(frequency,)).layout(8, 8, 1)
    assert window == 8
    np.testing.assert_array_equal(np.argwhere(mask[..., 0]), [cell])


def test_options_from_json_lists_stay_hashable():
    attack = make_attack("ftrojan", frequencies=[[1, 2]], channels=[1])
    assert attack.frequencies == ((1, 2),) and attack.channels == (1,)
    hash(attack)
    with pytest.raises(InvalidInputError, match="frequency"):
        make_attack("ftrojan", frequencies=[[32, 0]])
    with pytest.raises(InvalidInputError, match="channels"):
        make_attack("ftrojan", channels=[3])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"frequencies": 3}, "frequencies must be a non-empty list"),
        ({"frequencies": []}, "frequencies must be a non-empty list"),  # no trigger at all
        ({"frequencies": "15,15"}, "frequencies must be a non-empty list"),
        ({"frequencies": [[1.9, 2.2]]}, "frequencies must be a non-empty list"),
        ({"channels": 1}, "channels must be a list of integers"),
        ({"channels": "12"}, "channels must be a list of integers"),
        ({"channels": [1.7]}, "channels must be a list of integers"),
        ({"magnitude": 0.0}, "magnitude"),
    ],
)
def test_malformed_or_empty_options_are_refused_in_one_line(options, message):
    with pytest.raises(InvalidInputError, match=message):
        make_attack("ftrojan", **options)
