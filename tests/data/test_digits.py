"""scikit-learn's digits, the embedded dataset that needs no download."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fippure.data import load_dataset
from fippure.data.digits import load_digits as load_digits_split
from fippure.errors import InvalidInputError


def test_sizes_and_ranges():
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    for data in (train, test):
        assert data.images.shape[1:] == (8, 8, 1) and data.images.dtype == np.uint8
        assert data.images.min() == 0 and data.images.max() == 255
        assert data.labels.dtype == np.int32
        np.testing.assert_array_equal(np.unique(data.labels), np.arange(10))
        assert data.num_classes == 10 and data.spec.name == "digits"
    # Roughly balanced test split (about 36 of each digit).
    assert np.bincount(test.labels).min() >= 20


def test_splits_partition_the_dataset():
    raw = load_digits()
    full = np.round(raw.images * 255 / 16).astype(np.uint8).reshape(len(raw.target), -1)
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")

    def rows(images, labels):
        return sorted(im.tobytes() + bytes([lab]) for im, lab in zip(images, labels, strict=True))

    together = rows(
        np.concatenate([train.images, test.images]).reshape(1797, -1),
        np.concatenate([train.labels, test.labels]),
    )
    assert together == rows(full, raw.target)  # every image exactly once: disjoint and complete


def test_deterministic():
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_an_unknown_split_is_refused_not_read_as_train():
    with pytest.raises(InvalidInputError, match="unknown split 'validation'"):
        load_digits_split("validation")


def test_the_normalisation_constants_are_the_training_splits_statistics():
    from fippure.data.catalog import get_spec

    spec = get_spec("digits")
    pixels = load_dataset("digits", "train").images.astype(np.float64) / 255.0
    assert pixels.mean() == pytest.approx(spec.mean[0], abs=2e-3)
    assert pixels.std() == pytest.approx(spec.std[0], abs=2e-3)
