"""The defender's clean set D_v (SPEC section 1).

D_v is drawn from the *training* split with a fixed seed, class-balanced, and held out from
the poisoned training set, so the attacker never trained on it (choice: disjoint, as in the
seed code; ``fippure.recipes.prepare_data(clean_disjoint=False)``, ``--clean-overlap`` on the
command line, trains on its images too). Its indices are saved next to every result.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from fippure.config_checks import is_integer
from fippure.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class CleanSplit:
    """Indices into the training split.

    Attributes:
        clean: the defender's clean set D_v, sorted.
        rest: everything else (what the attacker trains on), sorted.
    """

    clean: np.ndarray
    rest: np.ndarray


def check_label_range(labels: np.ndarray, num_classes: int, what: str = "labels") -> None:
    """Raises a one-line error when a label lies outside ``[0, num_classes)``."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidInputError(
            f"{what} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def clean_set_size(size: int | float, num_train: int) -> int:
    """Turns a count (``500``, an integer) or a fraction of the training set (``0.01``, a float
    in (0, 1)) into a count. A float is always a fraction, as on the command line: ``1.0``
    (meant as the whole set?) and ``500.0`` are refused rather than read as counts.

    Args:
        size: an int count, or a float fraction of the training set in (0, 1).
        num_train: the size of the training set the clean set is drawn from.

    Returns:
        The count, an int in ``[1, num_train)`` (a fraction is rounded, to at least 1).

    Raises:
        InvalidInputError: a bool or other non-number, a float outside (0, 1), a count outside
            ``[1, num_train)``, or a fraction that rounds to the whole training set.
    """
    if isinstance(size, bool | np.bool_) or not isinstance(size, numbers.Real):
        raise InvalidInputError(f"clean-set size must be a count or a fraction, got {size!r}")
    if not isinstance(size, numbers.Integral):
        value = float(size)
        if not 0.0 < value < 1.0:
            countable = value.is_integer() and 1 <= value < num_train
            hint = f"; for {int(value)} image(s), pass the int {int(value)}" if countable else ""
            raise InvalidInputError(
                "clean-set size must be a whole count (an int) or a fraction in (0, 1), "
                f"got {size!r}{hint}"
            )
        count = max(1, int(round(value * num_train)))
        if count >= num_train:  # 0.999 of 100 images rounds to all of them
            raise InvalidInputError(
                f"a clean-set fraction of {size} takes all {num_train} training images; "
                "the attacker's part would be empty"
            )
        return count
    count = int(size)
    if count < 1 or count >= num_train:
        raise InvalidInputError(f"clean-set count must be in [1, {num_train}), got {count}")
    return count


def split_clean_set(
    labels: np.ndarray,
    size: int | float,
    num_classes: int,
    seed: int = 0,
    *,
    pool: str = "training images",
) -> CleanSplit:
    """Draws a class-balanced clean set and returns it with the held-out remainder.

    Every class gets ``count // K`` images and the first ``count % K`` classes (in a seeded
    order) one more, so 10 images on CIFAR-10 is one per class.

    Args:
        labels: integer labels of the training split.
        size: number of clean images, or a fraction of the training split in (0, 1).
        num_classes: K.
        seed: seed of the draw (host-side numpy plan).
        pool: what ``labels`` label, for the error message.

    Returns:
        A :class:`CleanSplit` of sorted, disjoint index arrays covering the training split.

    Raises:
        InvalidInputError: when the set would miss a class or a class has too few images.
    """
    labels = np.asarray(labels)
    check_label_range(labels, num_classes)
    count = clean_set_size(size, len(labels))
    if count < num_classes:
        raise InvalidInputError(
            f"a clean set of {count} images cannot hold all {num_classes} classes"
        )
    rng = np.random.default_rng(seed)
    per_class = np.full(num_classes, count // num_classes)
    per_class[rng.permutation(num_classes)[: count % num_classes]] += 1
    chosen = []
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class[cls]:
            raise InvalidInputError(
                f"class {cls} has {len(members)} {pool}, fewer than the "
                f"{per_class[cls]} the clean set needs"
            )
        chosen.append(rng.choice(members, size=per_class[cls], replace=False))
    clean = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.arange(len(labels)), clean, assume_unique=True)
    return CleanSplit(clean=clean, rest=rest)


def check_clean_set(labels: np.ndarray, num_classes: int) -> None:
    """Raises a clear error if a clean set misses a class or has out-of-range labels.

    Args:
        labels: the clean set's labels, a non-empty 1-D integer array.
        num_classes: K; each class in ``[0, K)`` must appear.

    Raises:
        InvalidInputError: labels that are empty or not 1-D, a label outside
            ``[0, num_classes)``, or a class without an example.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise InvalidInputError(f"the clean set is empty or malformed (labels {labels.shape})")
    check_label_range(labels, num_classes, "clean-set labels")
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise InvalidInputError(
            f"the clean set has no example of class(es) {missing}; purification needs every "
            "class (draw it with split_clean_set)"
        )


def hold_out_per_class(labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits a clean set into the part a defense trains on and a validation slice.

    The slice is the last ``per_class`` images of every class (choice: deterministic, so the
    same D_v always gives the same split); both parts keep every class.

    Returns:
        ``(fit, validation)``: sorted positions into ``labels``.

    Raises:
        InvalidInputError: ``per_class`` below 1, or a class with ``per_class`` images or fewer
            (it would leave none to train on).
    """
    labels = np.asarray(labels)
    if not is_integer(per_class) or per_class < 1:
        raise InvalidInputError(f"per_class must be a positive integer, got {per_class!r}")
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) <= per_class:
            raise InvalidInputError(
                f"class {int(cls)} has {len(members)} clean images; holding out {per_class} "
                "per class for validation needs more (a larger clean set, or a smaller "
                "validation_per_class)"
            )
        held.append(members[-per_class:])
    validation = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), validation), validation
