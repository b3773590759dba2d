"""The triggered test set on which ASR and RA are measured (SPEC section 1).

Only test images whose true label is not the target are triggered (all-to-one); for
all-to-all attacks every test image is, with target (y + 1) mod K. The trigger's randomness
(if any) comes from a fixed key, so the set is re-created exactly from the stored state.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fippure.attacks.base import Attack, State, apply_trigger
from fippure.attacks.poisoning import Mode, attack_targets, validate_target_and_mode
from fippure.config_checks import check_seed
from fippure.data.sources import ImageDataset


@dataclasses.dataclass(frozen=True, eq=False)
class TriggeredSet:
    """Triggered test images with their true and attack-target labels.

    Attributes:
        images: float32 ``(n, h, w, c)`` in [0, 1].
        true_labels: the labels before triggering.
        target_labels: what the attacker wants them classified as.
        source_indices: indices of the images in the test split.
    """

    images: np.ndarray
    true_labels: np.ndarray
    target_labels: np.ndarray
    source_indices: np.ndarray

    def __len__(self) -> int:
        return len(self.true_labels)

    def of_test_images(self, test_indices: np.ndarray) -> TriggeredSet:
        """The triggered copies of the test images at ``test_indices`` only.

        For judging a model on part of the test split: pair ``test.subset(test_indices)`` with
        ``triggered.of_test_images(test_indices)``. Order and ``source_indices`` are kept.
        """
        keep = np.isin(self.source_indices, np.asarray(test_indices))
        return TriggeredSet(
            self.images[keep],
            self.true_labels[keep],
            self.target_labels[keep],
            self.source_indices[keep],
        )


def triggered_test_set(
    attack: Attack,
    state: State,
    test: ImageDataset,
    *,
    target: int,
    mode: Mode,
    seed: int = 0,
) -> TriggeredSet:
    """Triggers the test images an attack is measured on (non-target ones for all-to-one).

    Args:
        attack: the attack whose trigger is applied.
        state: the attack's trigger state (as saved with the checkpoint).
        test: the clean test split.
        target: the attack's target class (0 for all-to-all).
        mode: ``all_to_one`` or ``all_to_all``.
        seed: seed of the trigger's randomness; the same seed re-creates the same set.

    Returns:
        A :class:`TriggeredSet`: float32 triggered images in [0, 1], their true and target
        labels (int32), and their indices in ``test``.

    Raises:
        InvalidInputError: a target that is not one of the test set's classes, an unknown
            mode (``"all2one"`` would keep the target-class images in an all-to-one ASR) or a
            seed outside ``[0, 2**32)``.
    """
    validate_target_and_mode(target, mode, test.num_classes)
    check_seed(seed)
    labels = test.labels
    keep = np.flatnonzero(labels != target) if mode == "all_to_one" else np.arange(len(labels))
    key = jax.random.fold_in(jax.random.key(seed), 0x7E57)
    images = apply_trigger(attack, state, test.images[keep], key)
    targets = attack_targets(labels[keep], target, mode, test.num_classes).astype(np.int32)
    return TriggeredSet(images, labels[keep].astype(np.int32), targets, keep)
