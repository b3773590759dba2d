"""The defender's clean set: class-balanced, disjoint from training, seeded (SPEC section 1)."""

from __future__ import annotations

import numpy as np
import pytest

from fippure.data import check_clean_set, clean_set_size, split_clean_set
from fippure.errors import InvalidInputError


def _labels(per_class: int = 50, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize(
    ("size", "expected_count"),
    [(10, 10), (20, 20), (100, 100), (0.02, 10), (0.05, 25), (0.2, 100), (25, 25), (13, 13)],
)
def test_balanced_disjoint_covering(size, expected_count):
    labels = _labels()
    split = split_clean_set(labels, size, num_classes=10, seed=3)
    assert len(split.clean) == expected_count
    counts = np.bincount(labels[split.clean], minlength=10)
    # Every class gets count // K images, count % K of them one more.
    assert counts.min() == expected_count // 10
    assert counts.max() == counts.min() + (expected_count % 10 != 0)
    assert np.sum(counts == counts.max()) == (expected_count % 10 or 10)
    assert np.intersect1d(split.clean, split.rest).size == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([split.clean, split.rest])), np.arange(500)
    )
    assert np.all(np.diff(split.clean) > 0) and np.all(np.diff(split.rest) > 0)


def test_one_per_class():
    labels = _labels()
    split = split_clean_set(labels, 10, num_classes=10, seed=0)
    np.testing.assert_array_equal(np.sort(labels[split.clean]), np.arange(10))
    check_clean_set(labels[split.clean], 10)


def test_seeded():
    labels = _labels()
    first = split_clean_set(labels, 50, 10, seed=7)
    again = split_clean_set(labels, 50, 10, seed=7)
    other = split_clean_set(labels, 50, 10, seed=8)
    np.testing.assert_array_equal(first.clean, again.clean)
    np.testing.assert_array_equal(first.rest, again.rest)
    assert not np.array_equal(first.clean, other.clean)
    # Different seeds still give balanced sets of the same size.
    np.testing.assert_array_equal(np.bincount(labels[other.clean], minlength=10), [5] * 10)


def test_unbalanced_labels_still_give_balanced_set():
    labels = np.concatenate([np.zeros(400, int), np.arange(1, 10).repeat(10)])
    split = split_clean_set(labels, 30, 10, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[split.clean], minlength=10), [3] * 10)


@pytest.mark.parametrize(
    ("size", "num_train", "expected"),
    [
        (500, 50000, 500),
        (0.01, 50000, 500),
        (0.05, 50000, 2500),
        (10, 50000, 10),
        (np.float32(0.05), 50000, 2500),  # numpy scalars are numbers too
        (np.int64(500), 50000, 500),
    ],
)
def test_clean_set_size(size, num_train, expected):
    assert clean_set_size(size, num_train) == expected


@pytest.mark.parametrize("size", [0, -1, 500, 1.5, True, 0.0, np.float32(2.7), "0.1", None])
def test_clean_set_size_errors(size):
    with pytest.raises(InvalidInputError, match="clean-set"):
        clean_set_size(size, 500)


@pytest.mark.parametrize("size", [1.0, 500.0, np.float64(20.0)])
def test_a_whole_float_is_not_read_as_a_count(size):
    """A float is a fraction, as ``--clean 1.0`` is on the command line: ``1.0`` was read as one
    image, where the caller more likely meant the whole set."""
    with pytest.raises(InvalidInputError, match=rf"for {int(size)} image\(s\), pass the int"):
        clean_set_size(size, 50000)
    with pytest.raises(InvalidInputError, match=r"got 5000\.0$"):  # no int would fit either
        clean_set_size(5000.0, 1000)


def test_too_small_for_all_classes():
    with pytest.raises(InvalidInputError, match="cannot hold all 10 classes"):
        split_clean_set(_labels(), 9, 10)


def test_class_lacking_examples():
    labels = np.concatenate([np.arange(10).repeat(20), [3] * 50])
    labels = labels[labels != 7]
    labels = np.concatenate([labels, [7]])  # class 7 has a single image
    with pytest.raises(InvalidInputError, match="class 7 has 1 training images"):
        split_clean_set(labels, 20, 10)


def test_check_clean_set_errors():
    with pytest.raises(InvalidInputError, match=r"no example of class\(es\) \[2, 9\]"):
        check_clean_set(np.array([0, 1, 3, 4, 5, 6, 7, 8]), 10)
    with pytest.raises(InvalidInputError, match="must lie in"):
        check_clean_set(np.array([0, 1, 10]), 10)
    with pytest.raises(InvalidInputError, match="empty"):
        check_clean_set(np.array([], int), 10)
    check_clean_set(np.arange(10).repeat(2), 10)  # complete: no error


def test_a_fraction_that_rounds_to_the_whole_training_set_is_refused():
    with pytest.raises(InvalidInputError, match="the attacker's part would be empty"):
        clean_set_size(0.999, 100)
    assert clean_set_size(0.99, 100) == 99


def test_labels_outside_the_classes_are_refused_not_ignored():
    labels = np.repeat(np.arange(11), 5)  # class 10 of a 10-class split was silently skipped
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 10\)"):
        split_clean_set(labels, 20, 10)
