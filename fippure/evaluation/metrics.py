"""Backdoor metrics (SPEC section 1), measured on the held-out test split only.

- ACC: accuracy on the whole clean test set.
- ASR: fraction of triggered test images whose true label is not the target that are
  predicted as the attack's target (all-to-all: (y + 1) mod K).
- RA: fraction of those same triggered images predicted as their true label.
- DER = (max(0, ASR_before - ASR_after) - max(0, ACC_before - ACC_after) + 1) / 2
  (BackdoorBench has a variant that *adds* the accuracy term; that is a bug).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

from fippure.attacks.triggered import TriggeredSet
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.inference import predict
from fippure.models.registry import Variables


def _class_labels(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as a vector of integer class labels: float probabilities, one-hot rows or a
    NaN would otherwise be compared entry by entry and give a plausible wrong rate."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise InvalidInputError(
            f"{name} must be one class label per image, got shape {values.shape} (take the "
            "argmax of logits or one-hot rows first)"
        )
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.issubdtype(values.dtype, np.floating) or not np.all(
            np.isfinite(values) & (values == np.round(values))
        ):
            raise InvalidInputError(f"{name} must be integer class labels, got {values.dtype}")
        values = values.astype(np.int64)
    return values


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``predictions`` equal to ``labels`` (both vectors of class labels).

    Args:
        predictions: ``(n,)`` predicted class labels (integers, or floats of integer value).
        labels: ``(n,)`` true class labels, likewise.

    Returns:
        The fraction, a Python float in [0, 1]; NaN when there are no labels.

    Raises:
        InvalidInputError: inputs that are not vectors of class labels (logits, one-hot rows,
            non-integral floats) or whose lengths differ.
    """
    predictions = _class_labels(predictions, "predictions")
    labels = _class_labels(labels, "labels")
    if predictions.shape != labels.shape:
        raise InvalidInputError(f"{predictions.shape} predictions for {labels.shape} labels")
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def _triggered_arrays(predictions, true_labels, target_labels):
    """The three label vectors of a triggered set, checked: one shape (a single target, as an
    all-to-one attack has, is broadcast to every image)."""
    predictions = _class_labels(predictions, "predictions")
    true_labels = _class_labels(true_labels, "true labels")
    target_labels = np.asarray(target_labels)
    if predictions.shape != true_labels.shape:
        raise InvalidInputError(
            f"{predictions.shape} predictions for {true_labels.shape} true labels; "
            "expected two vectors of one length"
        )
    if target_labels.shape not in ((), (1,), true_labels.shape):
        raise InvalidInputError(
            f"{target_labels.shape} target labels for {true_labels.shape} images; pass one "
            "target or one per image"
        )
    return predictions, true_labels, np.broadcast_to(target_labels, true_labels.shape)


def attack_success_rate(
    predictions: np.ndarray, true_labels: np.ndarray, target_labels: np.ndarray | int
) -> float:
    """ASR over triggered images whose true label differs from their target label.

    Images that already belong to the target class are excluded, whatever the caller passed.
    ``target_labels`` is one label per image, or a single target for all of them.

    Args:
        predictions: ``(n,)`` predicted labels of the triggered images.
        true_labels: ``(n,)`` their labels before triggering.
        target_labels: ``(n,)`` attack-target labels, or one target (scalar or ``(1,)``).

    Returns:
        The fraction of the kept images predicted as their target, a Python float; NaN when
        no image is kept.

    Raises:
        InvalidInputError: labels that are not vectors of class labels, or lengths that
            differ.
    """
    predictions, true_labels, target_labels = _triggered_arrays(
        predictions, true_labels, target_labels
    )
    keep = true_labels != target_labels
    return accuracy(predictions[keep], target_labels[keep])


def robust_accuracy(
    predictions: np.ndarray, true_labels: np.ndarray, target_labels: np.ndarray | int
) -> float:
    """RA: triggered non-target images still classified as their true label.

    Args:
        predictions: ``(n,)`` predicted labels of the triggered images.
        true_labels: ``(n,)`` their labels before triggering.
        target_labels: ``(n,)`` attack-target labels, or one target (scalar or ``(1,)``).

    Returns:
        The fraction of the images whose true label differs from their target that are
        predicted as their true label, a Python float; NaN when there is none.

    Raises:
        InvalidInputError: labels that are not vectors of class labels, or lengths that
            differ.
    """
    predictions, true_labels, target_labels = _triggered_arrays(
        predictions, true_labels, target_labels
    )
    keep = true_labels != target_labels
    return accuracy(predictions[keep], true_labels[keep])


def defense_effectiveness_rating(
    *, acc_before: float, asr_before: float, acc_after: float, asr_after: float
) -> float:
    """DER in [0, 1]: 1 when ASR falls from 1 to 0 at no accuracy cost, 0.5 for no change.

    Rates are fractions in [0, 1], as Python, NumPy or JAX scalars; the result is a Python
    float computed in float64. A NaN rate (an empty test set) gives NaN.

    Args:
        acc_before: clean accuracy of the backdoored model.
        asr_before: its attack success rate.
        acc_after: clean accuracy after the defense.
        asr_after: attack success rate after the defense.

    Returns:
        ``(max(0, asr_before - asr_after) - max(0, acc_before - acc_after) + 1) / 2``.

    Raises:
        InvalidInputError: a missing (``None``) rate, one that is not a number (a bool, an
            array), or one outside [0, 1].
    """
    rates = {
        "acc_before": acc_before,
        "asr_before": asr_before,
        "acc_after": acc_after,
        "asr_after": asr_after,
    }
    missing = sorted(k for k, v in rates.items() if v is None)
    if missing:
        raise InvalidInputError(
            f"DER needs all four rates; {', '.join(missing)} missing (a model with no attack "
            "has no ASR)"
        )
    kinds = {
        k: type(v).__name__
        for k, v in rates.items()
        if isinstance(v, bool)
        or np.ndim(v) != 0
        or not np.issubdtype(np.asarray(v).dtype, np.number)
        or np.iscomplexobj(v)
    }
    if kinds:
        raise InvalidInputError(f"DER takes four numbers (real scalars); got {kinds}")
    rates = {k: float(v) for k, v in rates.items()}
    if any(np.isnan(v) for v in rates.values()):
        return float("nan")
    outside = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
    if outside:
        raise InvalidInputError(
            f"DER takes rates in [0, 1] (fractions, not percent); got {outside}"
        )
    asr_fall = max(0.0, rates["asr_before"] - rates["asr_after"])
    acc_drop = max(0.0, rates["acc_before"] - rates["acc_after"])
    return (asr_fall - acc_drop + 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class BackdoorMetrics:
    """ACC, ASR and RA of one model on one attack's test sets."""

    acc: float
    asr: float
    ra: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def evaluate_backdoor(
    model: nn.Module,
    variables: Variables,
    test: ImageDataset,
    triggered: TriggeredSet,
    *,
    test_images: Any = None,
    triggered_images: Any = None,
) -> BackdoorMetrics:
    """ACC on ``test`` and ASR/RA on ``triggered`` (eval-mode predictions).

    Args:
        model: the classifier.
        variables: its variables (``params`` and, for BatchNorm models, ``batch_stats``).
        test: the clean test split.
        triggered: the attack's :class:`TriggeredSet` made from ``test``.
        test_images: ``test.images`` already on the device, for a caller that evaluates many
            times (by default each call uploads the NumPy images).
        triggered_images: ``triggered.images`` already on the device, likewise.

    Returns:
        :class:`BackdoorMetrics` with ``acc``, ``asr`` and ``ra`` as fractions (NaN for an
        empty set).

    Raises:
        InvalidInputError: ``triggered`` is ``None`` (a clean model), or images or variables
            that do not fit the model.
        NonFiniteLossError: the model's logits are NaN or infinite.
    """
    if triggered is None:
        raise InvalidInputError(
            "no triggered test set: the model carries no attack (a clean checkpoint); use "
            "fippure.inference.accuracy for its ACC"
        )
    if test_images is None:
        test_images = test.images
    if triggered_images is None:
        triggered_images = triggered.images
    clean_pred = predict(model, variables, test_images, test.spec)
    bad_pred = predict(model, variables, triggered_images, test.spec)
    return BackdoorMetrics(
        acc=accuracy(clean_pred, test.labels),
        asr=attack_success_rate(bad_pred, triggered.true_labels, triggered.target_labels),
        ra=robust_accuracy(bad_pred, triggered.true_labels, triggered.target_labels),
    )
