"""ACC, ASR, RA and DER (SPEC section 1) on hand-built predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fippure.errors import InvalidInputError
from fippure.evaluation.metrics import (
    accuracy,
    attack_success_rate,
    defense_effectiveness_rating,
    evaluate_backdoor,
    robust_accuracy,
)


def test_accuracy_counts_matches():
    assert accuracy([1, 2, 3, 0], [1, 2, 0, 0]) == pytest.approx(0.75)


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(InvalidInputError, match="predictions"):
        accuracy([1, 2, 3], [1, 2])


def test_asr_ignores_target_class_images():
    # target 0; the last two images already belong to the target class and are predicted 0.
    true = np.array([1, 2, 3, 4, 0, 0])
    target = np.zeros(6, int)
    pred = np.array([0, 0, 3, 4, 0, 0])
    # Counting the target-class images would give 4/6; only the 4 others count: 2/4.
    assert attack_success_rate(pred, true, target) == pytest.approx(0.5)
    assert np.mean(pred == target) == pytest.approx(4 / 6)


def test_asr_and_ra_all_to_all():
    true = np.array([0, 1, 2, 3])
    target = (true + 1) % 4
    pred = np.array([1, 1, 3, 2])  # hit, true, hit, neither
    assert attack_success_rate(pred, true, target) == pytest.approx(0.5)
    assert robust_accuracy(pred, true, target) == pytest.approx(0.25)


def test_ra_counts_true_labels_on_non_target_images():
    true = np.array([1, 2, 3, 4, 0])
    target = np.zeros(5, int)
    pred = np.array([1, 2, 0, 0, 0])
    assert robust_accuracy(pred, true, target) == pytest.approx(0.5)
    # ASR and RA partition the non-target images when every miss is either label.
    assert attack_success_rate(pred, true, target) + robust_accuracy(
        pred, true, target
    ) == pytest.approx(1.0)


def test_der_formula():
    der = defense_effectiveness_rating(
        acc_before=0.9, asr_before=1.0, acc_after=0.85, asr_after=0.02
    )
    assert der == pytest.approx((0.98 - 0.05 + 1.0) / 2.0)
    # BackdoorBench's buggy variant adds the accuracy drop; it would report a better defense.
    buggy = (0.98 + 0.05 + 1.0) / 2.0
    assert abs(der - buggy) > 0.04


@pytest.mark.parametrize(
    ("acc_before", "asr_before", "acc_after", "asr_after", "expected"),
    [
        (0.9, 1.0, 0.9, 1.0, 0.5),  # nothing changed
        (0.9, 1.0, 0.9, 0.0, 1.0),  # perfect defense
        (0.9, 0.1, 0.95, 0.5, 0.5),  # gains are clipped at zero on both terms
        (0.9, 1.0, 0.1, 1.0, 0.1),  # only accuracy lost
    ],
)
def test_der_edge_cases(acc_before, asr_before, acc_after, asr_after, expected):
    der = defense_effectiveness_rating(
        acc_before=acc_before, asr_before=asr_before, acc_after=acc_after, asr_after=asr_after
    )
    assert der == pytest.approx(expected)


def test_asr_and_ra_take_a_single_target():
    predictions, labels = np.array([0, 0, 1, 0]), np.array([0, 1, 2, 3])
    assert attack_success_rate(predictions, labels, 0) == attack_success_rate(
        predictions, labels, np.zeros(4, int)
    )
    assert robust_accuracy(predictions, labels, 0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("predictions", "labels", "targets"),
    [([0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]), ([0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0])],
)
def test_asr_and_ra_reject_mismatched_lengths(predictions, labels, targets):
    for metric in (attack_success_rate, robust_accuracy):
        with pytest.raises(InvalidInputError, match="expected two vectors|target labels for"):
            metric(predictions, labels, targets)


def test_der_propagates_nan_and_rejects_percentages():
    assert math.isnan(
        defense_effectiveness_rating(
            acc_before=float("nan"), asr_before=1.0, acc_after=0.9, asr_after=0.0
        )
    )
    with pytest.raises(InvalidInputError, match="fractions, not percent"):
        defense_effectiveness_rating(acc_before=90, asr_before=100, acc_after=88, asr_after=2)


def test_der_of_a_model_without_an_attack_is_refused_in_one_line():
    with pytest.raises(InvalidInputError, match="asr_after, asr_before missing"):
        defense_effectiveness_rating(
            acc_before=0.9, asr_before=None, acc_after=0.88, asr_after=None
        )


def test_backdoor_metrics_need_a_triggered_set():
    with pytest.raises(InvalidInputError, match="no triggered test set"):
        evaluate_backdoor(None, {}, None, None)


@pytest.mark.parametrize(
    "predictions",
    [[0.2, 0.8, 0.1, 0.9], [1.0, float("nan"), 0.0, 1.0], np.eye(4, dtype=np.int64)],
    ids=["probabilities", "nan", "one_hot"],
)
def test_predictions_that_are_not_class_labels_are_refused(predictions):
    # each once gave a plausible wrong rate: 0.0, 0.75 and 0.9 (entry-wise one-hot match)
    with pytest.raises(InvalidInputError, match="class label"):
        accuracy(predictions, [1, 0, 2, 3])
    with pytest.raises(InvalidInputError, match="class label"):
        attack_success_rate(predictions, [1, 0, 2, 3], 0)


def test_whole_float_labels_are_accepted_as_class_labels():
    assert accuracy(np.array([1.0, 2.0]), [1, 3]) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", ["0.9", np.array([0.9, 0.8]), True, 0.9 + 0j, np.complex64(0.9)])
def test_der_refuses_a_rate_that_is_not_one_number(bad):
    with pytest.raises(InvalidInputError, match="DER takes four numbers"):
        defense_effectiveness_rating(acc_before=bad, asr_before=1.0, acc_after=0.8, asr_after=0.0)
    assert defense_effectiveness_rating(
        acc_before=np.float32(0.9), asr_before=1.0, acc_after=0.9, asr_after=0.0
    ) == pytest.approx(1.0)


def test_der_of_jax_and_numpy_scalars_is_a_python_float_in_double_precision():
    import jax.numpy as jnp

    der = defense_effectiveness_rating(
        acc_before=jnp.float32(0.9), asr_before=np.float32(1.0), acc_after=0.85, asr_after=0.01
    )
    # a JAX array here would not go into a JSON report, and float32 arithmetic would round
    assert type(der) is float
    assert der == pytest.approx(
        (1.0 - 0.01 - (float(np.float32(0.9)) - 0.85) + 1.0) / 2.0, rel=0, abs=1e-12
    )


def test_evaluate_backdoor_scores_clean_and_triggered_predictions_against_their_labels(
    monkeypatch,
):
    """ACC from the clean test images against their labels; ASR and RA from the triggered
    images against their target and true labels (predictions stubbed by the images given)."""
    from fippure.attacks.triggered import TriggeredSet
    from fippure.data.catalog import get_spec
    from fippure.data.sources import ImageDataset
    from fippure.evaluation import metrics

    spec = get_spec("digits")
    test = ImageDataset(np.zeros((5, 8, 8, 1), np.uint8), np.array([0, 1, 2, 3, 4]), spec, "test")
    triggered = TriggeredSet(
        np.ones((4, 8, 8, 1), np.float32),
        true_labels=np.array([1, 2, 3, 4]),
        target_labels=np.zeros(4, np.int64),
        source_indices=np.array([1, 2, 3, 4]),
    )
    clean_pred = np.array([0, 1, 2, 0, 0])  # 3 of 5 right
    bad_pred = np.array([0, 0, 3, 1])  # 2 sent to the target, 1 kept its true label

    def predict(model, variables, images, spec):
        return clean_pred if np.asarray(images).max() == 0 else bad_pred

    monkeypatch.setattr(metrics, "predict", predict)
    result = evaluate_backdoor(None, {}, test, triggered)
    assert (result.acc, result.asr, result.ra) == pytest.approx((0.6, 0.5, 0.25))
