"""Poisoning plans (SPEC section 1): counts, eligible images, labels, seeds and errors."""

from __future__ import annotations

import numpy as np
import pytest

from fippure.attacks import make_poison_plan
from fippure.errors import InvalidInputError

K = 10


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).integers(0, K, 1000)


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.333])
@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_poisoned_count_is_ratio_of_whole_set(labels, ratio, mode):
    plan = make_poison_plan(labels, ratio=ratio, num_classes=K, mode=mode, seed=1)
    assert len(plan.indices) == round(ratio * len(labels)) == plan.requested
    assert plan.ratio == pytest.approx(len(plan.indices) / len(labels))
    assert len(np.unique(plan.indices)) == len(plan.indices)
    assert np.all(np.diff(plan.indices) > 0)


@pytest.mark.parametrize("target", [0, 3])
def test_dirty_label_poisons_non_target_images_to_target(labels, target):
    plan = make_poison_plan(labels, ratio=0.2, num_classes=K, target=target, seed=0)
    assert np.all(labels[plan.indices] != target)
    assert np.all(plan.labels == target)
    assert not plan.clean_label


def test_clean_label_poisons_only_target_images_and_keeps_labels(labels):
    plan = make_poison_plan(labels, ratio=0.05, num_classes=K, target=2, clean_label=True)
    assert len(plan.indices) == 50
    assert np.all(labels[plan.indices] == 2)
    np.testing.assert_array_equal(plan.labels, labels[plan.indices])


def test_clean_label_is_capped_by_target_class_size(labels):
    plan = make_poison_plan(labels, ratio=0.5, num_classes=K, target=0, clean_label=True)
    assert plan.requested == 500
    assert len(plan.indices) == np.sum(labels == 0)
    np.testing.assert_array_equal(plan.indices, np.flatnonzero(labels == 0))


def test_all_to_all_labels(labels):
    plan = make_poison_plan(labels, ratio=0.3, num_classes=K, mode="all_to_all", seed=4)
    np.testing.assert_array_equal(plan.labels, (labels[plan.indices] + 1) % K)
    # all-to-all may poison every class, including class 0
    assert set(np.unique(labels[plan.indices])) == set(range(K))


def test_dense_view_matches_plan(labels):
    plan = make_poison_plan(labels, ratio=0.1, num_classes=K, seed=2)
    is_poisoned, label = plan.dense()
    np.testing.assert_array_equal(np.flatnonzero(is_poisoned), plan.indices)
    np.testing.assert_array_equal(label[plan.indices], plan.labels)
    assert np.all(label[~is_poisoned] == -1)


def test_same_seed_same_plan_other_seed_other_plan(labels):
    a = make_poison_plan(labels, ratio=0.1, num_classes=K, seed=7)
    b = make_poison_plan(labels, ratio=0.1, num_classes=K, seed=7)
    c = make_poison_plan(labels, ratio=0.1, num_classes=K, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.indices, c.indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\)"),
        ({"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \(0, 1\)"),
        ({"ratio": 0.1, "target": 10}, "target 10 is out of range for 10 classes"),
        ({"ratio": 0.1, "target": -1}, "target -1 is out of range"),
        ({"ratio": 0.1, "mode": "all_to_some"}, "unknown attack mode"),
        (
            {"ratio": 0.1, "mode": "all_to_all", "clean_label": True},
            "clean-label attack cannot be all-to-all",
        ),
        ({"ratio": 0.1, "mode": "all_to_all", "target": 3}, "no single target"),
        ({"ratio": 0.0001}, "poisons no example"),
        ({"ratio": 0.95}, "only .* are eligible"),
    ],
)
def test_bad_requests_are_one_line_errors(labels, kwargs, message):
    with pytest.raises(InvalidInputError, match=message) as error:
        make_poison_plan(labels, num_classes=K, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("name", "options"), [("blend", {"alpha": 0.0}), ("sig", {"delta": 0.0})])
def test_a_trigger_of_strength_zero_is_refused(name, options):
    from fippure.attacks import make_attack

    with pytest.raises(InvalidInputError):
        make_attack(name, **options)


@pytest.mark.parametrize(("target", "ratio"), [(1.5, 0.1), (True, 0.1), (0, "0.1")])
def test_a_target_or_ratio_of_the_wrong_type_is_refused(target, ratio):
    from fippure.attacks import validate_attack_args

    with pytest.raises(InvalidInputError, match="must be"):
        validate_attack_args(
            ratio=ratio, target=target, mode="all_to_one", num_classes=10, clean_label=False
        )


@pytest.mark.parametrize("seed", [None, -1, 1.5, 2**32, True])
def test_a_plan_needs_an_integer_seed(labels, seed):
    # None drew another plan every call; -1 and 1.5 failed inside numpy
    with pytest.raises(InvalidInputError, match="seed must be an integer in"):
        make_poison_plan(labels, ratio=0.1, num_classes=10, seed=seed)


def test_the_poisoned_count_is_the_ratio_rounded_to_the_nearest_image():
    # 10% of digits' 1,437 attacker images is 143.7: 144 poisoned, not 143
    labels = np.arange(1437) % 10
    plan = make_poison_plan(labels, ratio=0.1, num_classes=10, target=0, seed=0)
    assert len(plan.indices) == 144


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 10, 3] * 50), r"labels must lie in \[0, 10\), got \[0, 10\]"),
        (np.array([0, 1, -1, 3] * 50), r"labels must lie in \[0, 10\)"),
        (np.array([0.5, 1.5] * 100), "1-D array of integer class indices, got float64"),
        (np.eye(10, dtype=np.int64)[np.arange(200) % 10], r"got int64 of shape \(200, 10\)"),
    ],
    ids=["above", "negative", "float", "one_hot"],
)
def test_labels_that_are_not_class_indices_are_refused(labels, message):
    """All-to-all had relabelled a label 10 as 1 and -1 as 0; one-hot rows gave an IndexError."""
    with pytest.raises(InvalidInputError, match=message):
        make_poison_plan(labels, ratio=0.1, num_classes=10, mode="all_to_all")
