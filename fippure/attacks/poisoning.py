"""Poisoning plans: which training examples carry the trigger and what they are relabelled to.

SPEC section 1: the poison ratio is poisoned samples / whole training set. All-to-one attacks
relabel to ``target`` (0 by default); all-to-all attacks map y -> (y + 1) mod K. Dirty-label
attacks poison only images whose label differs from the target (all of them for all-to-all);
clean-label attacks (SIG, label-consistent) poison only target-class images and keep their
labels, so they can poison at most every target-class image.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from fippure.config_checks import check_seed
from fippure.data.splits import check_label_range
from fippure.errors import InvalidInputError

Mode = Literal["all_to_one", "all_to_all"]
MODES = ("all_to_one", "all_to_all")


def attack_targets(labels, target: int, mode: Mode, num_classes: int):
    """The label an attack wants for triggered inputs of true label ``labels``.

    Works on numpy and JAX arrays alike.

    Args:
        labels: integer true labels, any shape (a NumPy or JAX array).
        target: the target class of an all-to-one attack (not used for all-to-all).
        mode: ``all_to_one`` (every label becomes ``target``) or ``all_to_all``
            (``y -> (y + 1) mod num_classes``).
        num_classes: K.

    Returns:
        The target labels, an array of the shape and dtype of ``labels`` (a JAX array for JAX
        input).

    Raises:
        InvalidInputError: an unknown ``mode``.
    """
    if mode not in MODES:
        raise InvalidInputError(f"unknown attack mode {mode!r}; use {' or '.join(MODES)}")
    if mode == "all_to_all":
        return (labels + 1) % num_classes
    xp = jnp if isinstance(labels, Array) else np
    return xp.full_like(labels, target)


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
    """Which examples of a training set are poisoned.

    Attributes:
        indices: sorted indices of the poisoned examples (into the training set the plan was
            made for).
        labels: the labels those examples are trained with.
        num_examples: size of that training set.
        target: the target class (all-to-one).
        mode: ``all_to_one`` or ``all_to_all``.
        clean_label: whether poisoned examples keep their (target-class) labels.
        requested: how many poisoned examples the ratio asked for (``len(indices)`` can be
            smaller for clean-label attacks, which run out of target-class images).
    """

    indices: np.ndarray
    labels: np.ndarray
    num_examples: int
    target: int
    mode: Mode
    clean_label: bool
    requested: int

    @property
    def ratio(self) -> float:
        """The realised poison ratio (poisoned / whole training set)."""
        return len(self.indices) / self.num_examples

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``(is_poisoned, label)`` arrays over the whole training set (for in-graph lookup).

        ``label`` is the training label of poisoned examples and -1 elsewhere.
        """
        is_poisoned = np.zeros(self.num_examples, bool)
        is_poisoned[self.indices] = True
        label = np.full(self.num_examples, -1, np.int32)
        label[self.indices] = self.labels
        return is_poisoned, label


def make_poison_plan(
    labels: np.ndarray,
    *,
    ratio: float,
    num_classes: int,
    target: int = 0,
    mode: Mode = "all_to_one",
    clean_label: bool = False,
    seed: int = 0,
) -> PoisonPlan:
    """Draws the poisoned examples of a training set.

    Args:
        labels: the true labels of the training set the attacker trains on. In fippure's
            recipes that is the training split without the defender's clean set D_v (49,500
            of CIFAR-10's 50,000 images with 500 clean), so ratio 0.1 poisons 4,950 images:
            0.099 of the whole split.
        ratio: poisoned examples / that training set, in (0, 1) (**choice**: SPEC section 1's
            "whole training set" read as the set the model trains on, all its classes; pass
            the whole split's labels, or ``ratio * split / len(labels)``, for the other
            reading). The realised ratio is recorded with the plan.
        num_classes: K.
        target: the target class of all-to-one attacks.
        mode: ``all_to_one`` or ``all_to_all``.
        clean_label: poison only target-class images and keep their labels.
        seed: seed of the draw.

    Raises:
        InvalidInputError: for labels that are not 1-D integer classes in ``[0, K)``, a ratio
            outside (0, 1), a target out of range, an unknown mode, a clean-label all-to-all
            request, or too few candidate images.
    """
    labels = np.asarray(labels)
    validate_attack_args(
        ratio=ratio, target=target, mode=mode, num_classes=num_classes, clean_label=clean_label
    )
    check_seed(seed)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(
            "labels must be a 1-D array of integer class indices, got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    # all-to-all would relabel a label K as (K + 1) mod K = 1
    check_label_range(labels, num_classes)
    n = len(labels)
    requested = int(round(ratio * n))
    if requested < 1:
        raise InvalidInputError(f"ratio {ratio} poisons no example of {n}")
    if clean_label:
        candidates = np.flatnonzero(labels == target)
    elif mode == "all_to_one":
        candidates = np.flatnonzero(labels != target)
    else:
        candidates = np.arange(n)
    count = min(requested, len(candidates))
    if count == 0:
        raise InvalidInputError(f"no training image can be poisoned (target {target})")
    if count < requested and not clean_label:
        raise InvalidInputError(
            f"ratio {ratio} asks for {requested} poisoned images but only {len(candidates)} "
            "are eligible"
        )
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(candidates, size=count, replace=False))
    new_labels = (
        labels[indices].astype(np.int32)
        if clean_label
        else attack_targets(labels[indices], target, mode, num_classes).astype(np.int32)
    )
    return PoisonPlan(indices, new_labels, n, int(target), mode, clean_label, requested)


def validate_attack_args(
    *, ratio: float, target: int, mode: str, num_classes: int, clean_label: bool
) -> None:
    """One-line errors for impossible attack settings.

    Args:
        ratio: the poison ratio, a number in (0, 1).
        target: the target class, an integer in ``[0, num_classes)`` (0 for all-to-all).
        mode: ``all_to_one`` or ``all_to_all``.
        num_classes: K.
        clean_label: whether the attack is clean-label.

    Raises:
        InvalidInputError: a ratio that is not a number in (0, 1), a target that is not an
            integer class (or is not 0 for all-to-all), an unknown mode, or a clean-label
            all-to-all attack.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.floating):
        raise InvalidInputError(f"poison ratio must be a number in (0, 1), got {ratio!r}")
    if not 0.0 < ratio < 1.0:
        raise InvalidInputError(f"poison ratio must be in (0, 1), got {ratio}")
    validate_target_and_mode(target, mode, num_classes)
    if clean_label and mode == "all_to_all":
        raise InvalidInputError(
            "a clean-label attack cannot be all-to-all: it keeps the true labels of "
            "target-class images"
        )


def validate_target_and_mode(target: int, mode: str, num_classes: int) -> None:
    """One-line errors for a target that is not a class or an unknown mode (which would
    otherwise count as all-to-one)."""
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise InvalidInputError(f"target must be an integer class, got {target!r}")
    if mode not in MODES:
        raise InvalidInputError(f"unknown attack mode {mode!r}; use {' or '.join(MODES)}")
    if not 0 <= target < num_classes:
        raise InvalidInputError(f"target {target} is out of range for {num_classes} classes")
    if mode == "all_to_all" and target != 0:
        # it would be recorded as the attack's target, but no image is sent there
        raise InvalidInputError(
            f"an all-to-all attack has no single target (y -> (y + 1) mod K); leave target "
            f"at 0, got {target}"
        )


def poisoned_rows(
    is_poisoned: Array, poison_label: Array, rows: Int[Array, " b"]
) -> tuple[Array, Array]:
    """In-graph lookup of the plan for a batch: ``(mask, label)`` at ``rows``."""
    return is_poisoned[rows], poison_label[rows]
