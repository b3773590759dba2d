"""Loading a backdoored model (a zoo entry or any ``fippure attack`` output) with its data.

``load_backdoored(path)`` rebuilds the model, the attack and its state, the defender's clean
set (from the stored indices) and the exact triggered test set, so a defense can be run and
judged without retraining anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fippure.attacks import Attack, TriggeredSet, make_attack, triggered_test_set
from fippure.attacks.poisoning import validate_attack_args
from fippure.checkpoints import Checkpoint, load_checkpoint
from fippure.config_checks import check_seed, is_integer
from fippure.data.catalog import DatasetSpec, get_spec
from fippure.data.sources import ImageDataset, load_dataset
from fippure.errors import CheckpointError, InvalidInputError
from fippure.models.registry import with_dtype


@dataclasses.dataclass
class BackdooredModel:
    """A model with everything needed to purify and evaluate it.

    Attributes:
        checkpoint: the loaded checkpoint (model, variables, metadata).
        attack: the attack (``None`` for a clean model).
        attack_state: the attack's state pytree.
        clean: the defender's clean set D_v (from the training split).
        test: the test split.
        triggered: the triggered test set (``None`` for a clean model).
        target: the attack's target class.
        mode: ``all_to_one`` or ``all_to_all``.
        clean_indices: indices of ``clean`` in the training split.
    """

    checkpoint: Checkpoint
    attack: Attack | None
    attack_state: dict[str, Any]
    clean: ImageDataset
    test: ImageDataset
    triggered: TriggeredSet | None
    target: int | None
    mode: str | None
    clean_indices: np.ndarray

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def variables(self):
        return self.checkpoint.variables

    @property
    def spec(self):
        return self.test.spec


def stored_clean_indices(meta: dict[str, Any], path: Any, train_size: int) -> np.ndarray:
    """The checkpoint's clean-set indices into the training split, checked: distinct integers
    in ``[0, train_size)`` (a negative index would wrap to another image and a repeated one
    would count an image twice)."""
    raw = meta["clean_indices"]
    if not isinstance(raw, list) or not raw:
        raise CheckpointError(f"corrupt checkpoint {path}: clean_indices is not a non-empty list")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise CheckpointError(f"corrupt checkpoint {path}: clean_indices holds non-integers")
    indices = np.asarray(raw, dtype=np.int64)
    outside = indices[(indices < 0) | (indices >= train_size)]
    if outside.size:
        raise CheckpointError(
            f"corrupt checkpoint {path}: clean index {int(outside[0])} is outside the training "
            f"split (0..{train_size - 1})"
        )
    if np.unique(indices).size != indices.size:
        raise CheckpointError(f"corrupt checkpoint {path}: clean_indices repeats an image")
    return indices


def check_attack_metadata(attack_meta: Any, path: Any, num_classes: int) -> None:
    """The stored attack's target, mode and ratio pass the checks ``fippure attack`` applies
    (a target outside the classes would report every backdoor as absent)."""
    if not isinstance(attack_meta, dict) or not {"name", "target", "mode"} <= set(attack_meta):
        raise CheckpointError(
            f"corrupt checkpoint {path}: its attack entry needs name, target and mode"
        )
    try:
        validate_attack_args(
            ratio=attack_meta.get("ratio", 0.5),  # fippure stores it; a missing one is not judged
            target=attack_meta["target"],
            mode=attack_meta["mode"],
            num_classes=num_classes,
            clean_label=bool(attack_meta.get("clean_label", False)),
        )
    except InvalidInputError as error:
        raise CheckpointError(f"corrupt checkpoint {path}: {error}") from None


def check_image_shape(meta: Mapping[str, Any], path: Any, spec: DatasetSpec) -> None:
    """A one-line :class:`CheckpointError` for a checkpoint whose metadata names images of
    another shape than its dataset's (the model would fail deep inside Flax)."""
    stored_shape = meta.get("image_shape")
    if stored_shape is not None and tuple(stored_shape) != tuple(spec.image_shape):
        raise CheckpointError(
            f"{path} was made for {tuple(stored_shape)} images, but {spec.name} has "
            f"{tuple(spec.image_shape)}"
        )


def load_backdoored(
    path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    clean_size: int | float | None = None,
    clean_seed: int | None = None,
    dtype: str | None = None,
) -> BackdooredModel:
    """Loads a checkpoint written by ``fippure attack`` or ``fippure train``.

    Args:
        path: the checkpoint directory.
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR``).
        clean_size: use a different clean set of this size (a count, or a fraction of the
            training split), drawn class-balanced from the *stored* clean set so that it stays
            disjoint from the attacker's training data. Default: the stored clean set.
        clean_seed: seed of that sub-draw (default: the stored clean seed).
        dtype: compute in this dtype (``"bfloat16"``, say; see
            :func:`fippure.models.with_dtype`) instead of the one the model was saved with.
            The variables are loaded as stored.
    """
    from fippure.data.splits import clean_set_size, split_clean_set

    checkpoint = load_checkpoint(path)
    if dtype is not None:
        checkpoint = dataclasses.replace(checkpoint, model=with_dtype(checkpoint.model, dtype))
    meta = checkpoint.metadata
    dataset = meta.get("dataset")
    if dataset is None or "clean_indices" not in meta:
        raise CheckpointError(f"{path} has no dataset or clean-set indices in its metadata")
    spec = get_spec(dataset)
    check_image_shape(meta, path, spec)
    if clean_seed is not None:
        check_seed(clean_seed, "clean_seed")
    stored_norm = meta.get("normalization")
    if stored_norm:
        stored = (tuple(stored_norm["mean"]), tuple(stored_norm["std"]))
        if not np.allclose(stored, (spec.mean, spec.std), rtol=0, atol=1e-6):
            raise CheckpointError(
                f"{path} was trained with normalisation mean {stored[0]} / std {stored[1]}, "
                f"but fippure normalises {dataset} with {spec.mean} / {spec.std}"
            )
    train = load_dataset(dataset, "train", data_dir=data_dir)
    test = load_dataset(dataset, "test", data_dir=data_dir)
    clean_indices = stored_clean_indices(meta, path, len(train))
    attack_meta = meta.get("attack")
    if attack_meta:
        check_attack_metadata(attack_meta, path, train.num_classes)
    if clean_size is not None:
        if is_integer(clean_size) and clean_size > len(clean_indices):
            count = int(clean_size)  # a count beyond the stored set: say so, whatever the split
        else:
            count = clean_set_size(clean_size, len(train))
        if count > len(clean_indices):
            raise CheckpointError(
                f"the checkpoint holds {len(clean_indices)} clean images; cannot draw {count} "
                "without touching the attacker's training data"
            )
        if count < len(clean_indices):
            seed = meta.get("clean_seed", 0) if clean_seed is None else clean_seed
            sub = split_clean_set(
                train.labels[clean_indices],
                count,
                train.num_classes,
                seed,
                pool="images in the checkpoint's stored clean set",
            )
            clean_indices = clean_indices[sub.clean]
    clean = train.subset(clean_indices, "clean")
    if not attack_meta:
        return BackdooredModel(checkpoint, None, {}, clean, test, None, None, None, clean_indices)
    attack = make_attack(attack_meta["name"], **attack_meta.get("options", {}))
    state = jax.tree_util.tree_map(jax.numpy.asarray, checkpoint.extras.get("attack_state", {}))
    triggered = triggered_test_set(
        attack,
        state,
        test,
        target=attack_meta["target"],
        mode=attack_meta["mode"],
        seed=attack_meta.get("seed", 0),
    )
    return BackdooredModel(
        checkpoint,
        attack,
        state,
        clean,
        test,
        triggered,
        attack_meta["target"],
        attack_meta["mode"],
        clean_indices,
    )
