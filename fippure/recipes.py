"""End-to-end recipes that tie data, models, training and checkpoints together.

``train_classifier`` is what ``fippure train`` runs: it draws the defender's clean set from the
training split (held out from training, SPEC section 1), trains on the rest, evaluates on the
test split, and writes a checkpoint plus a JSON report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax

from fippure.checkpoints import model_metadata, save_checkpoint
from fippure.data.sources import ImageDataset, load_dataset
from fippure.data.splits import split_clean_set
from fippure.inference import accuracy
from fippure.models.registry import create_model, init_variables
from fippure.provenance import provenance
from fippure.training import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """The splits every run uses.

    Attributes:
        train: the training images the model is trained on (the clean set removed).
        clean: the defender's clean set D_v (from the training split).
        test: the test split.
        clean_indices: indices of ``clean`` in the full training split.
        train_indices: indices of ``train`` in the full training split.
    """

    train: ImageDataset
    clean: ImageDataset
    test: ImageDataset
    clean_indices: Any
    train_indices: Any


def prepare_data(
    dataset: str,
    *,
    clean_size: int | float = 0.01,
    clean_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> PreparedData:
    """Loads ``dataset`` and splits the defender's clean set off its training split."""
    full = load_dataset(dataset, "train", data_dir=data_dir, download=download)
    test = load_dataset(dataset, "test", data_dir=data_dir, download=download)
    split = split_clean_set(full.labels, clean_size, full.num_classes, seed=clean_seed)
    return PreparedData(
        train=full.subset(split.rest, "train-minus-clean"),
        clean=full.subset(split.clean, "clean"),
        test=test,
        clean_indices=split.clean,
        train_indices=split.rest,
    )


def train_classifier(
    *,
    dataset: str,
    model: str,
    out: str | os.PathLike,
    config: TrainConfig,
    model_kwargs: dict[str, Any] | None = None,
    clean_size: int | float = 0.01,
    clean_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains a clean classifier, checkpoints it in ``out`` and returns the JSON report.

    ``out`` receives the final checkpoint (``metadata.json``, ``variables/``), ``report.json``
    and ``train/`` (orbax checkpoints of the run; re-running the same command resumes).
    """
    out = pathlib.Path(out).resolve()
    data = prepare_data(dataset, clean_size=clean_size, clean_seed=clean_seed, data_dir=data_dir)
    model_kwargs = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    network = create_model(model, data.train.num_classes, **model_kwargs)
    variables = init_variables(network, jax.random.key(config.seed), data.train.spec.image_shape)
    spec = data.train.spec

    def evaluate(variables):
        return {"test_accuracy": accuracy(network, variables, data.test.images, data.test.labels, spec)}

    variables, report = train(
        network, data.train, config, variables=variables, workdir=out / "train",
        evaluate=evaluate, progress=progress,
    )
    metadata = {
        "model": model_metadata(model, data.train.num_classes, **model_kwargs),
        "dataset": dataset,
        "image_shape": list(spec.image_shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "attack": None,
        "clean_indices": data.clean_indices,
        "clean_seed": clean_seed,
        "train_config": dataclasses.asdict(config),
    }
    save_checkpoint(out, variables, metadata)
    result = {
        "dataset": dataset,
        "model": model,
        "model_kwargs": model_kwargs,
        "test_accuracy": report.final.get("test_accuracy"),
        "epochs": config.epochs,
        "train_examples": len(data.train),
        "clean_examples": len(data.clean),
        "wall_time_s": report.wall_time_s,
        "train_images_per_s": report.train_images_per_s,
        "resumed_from_step": report.resumed_from_step,
        "history": report.history,
        "train_config": dataclasses.asdict(config),
        **provenance(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    return result
