"""Fixtures shared by the attack tests: a small clean digits model as a reference."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from fippure.checkpoints import model_metadata, save_checkpoint
from fippure.data.sources import load_dataset
from fippure.models.registry import create_model, init_variables
from fippure.training import TrainConfig, train


@dataclasses.dataclass
class Reference:
    """A clean model trained on the digits: its module, variables and checkpoint path."""

    model: object
    variables: dict
    path: str


@pytest.fixture(scope="session")
def digits_reference(tmp_path_factory) -> Reference:
    """A clean ``small_cnn`` trained for a few epochs on the digits (about 97% accuracy)."""
    data = load_dataset("digits", "train")
    model = create_model("small_cnn", data.num_classes, width=8)
    variables = init_variables(model, jax.random.key(0), data.spec.image_shape)
    config = TrainConfig(epochs=6, batch_size=64, learning_rate=0.1, eval_every=100)
    variables, _ = train(model, data, config, variables=variables, progress=False)
    path = tmp_path_factory.mktemp("digits_reference")
    metadata = {
        "model": model_metadata("small_cnn", data.num_classes, width=8),
        "dataset": "digits",
        "image_shape": list(data.spec.image_shape),
    }
    save_checkpoint(path, variables, metadata)
    return Reference(model, variables, str(path))
