"""Resuming a defense: a finished run called again, progress of another run refused, and the
checkpoint interval."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from clean_sets import random_digits_clean_set

from fippure.errors import CheckpointError
from fippure.models import create_model, init_variables
from fippure.purify import DEFENSES, make_config
from fippure.purify.resume import Checkpointing


@pytest.fixture(scope="module")
def tiny():
    clean = random_digits_clean_set(per_class=4)
    model = create_model("small_cnn", 10, width=4)
    return model, init_variables(model, jax.random.key(1), clean.spec.image_shape), clean


def _ft(**extra):
    return make_config("ft", {"steps": "3", "batch_size": "16", "log_every": "2", **extra})


def test_a_finished_run_called_again_resumes_from_its_last_step(tiny, tmp_path):
    """Progress is saved after the last step too (3 is not a multiple of every=2), and a
    directory that holds every step returns the same result without taking a step."""
    model, variables, clean = tiny
    purify, saving, key = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2), jax.random.key(5)
    first, first_report = purify(
        model, variables, clean, _ft(), key, progress=False, checkpointing=saving
    )
    again, report = purify(
        model, variables, clean, _ft(), key, progress=False, checkpointing=saving
    )
    assert first_report.resumed_from_step == 0
    assert report.resumed_from_step == 3 and report.steps == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, first)
    assert report.loss_curve == first_report.loss_curve


def test_progress_from_other_starting_weights_or_another_clean_set_is_refused(tiny, tmp_path):
    model, variables, clean = tiny
    purify, saving = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2)
    purify(model, variables, clean, _ft(), 0, progress=False, checkpointing=saving)
    other_weights = init_variables(model, jax.random.key(2), clean.spec.image_shape)
    with pytest.raises(CheckpointError, match="holds a run with a different variables"):
        purify(model, other_weights, clean, _ft(), 0, progress=False, checkpointing=saving)
    other_clean = random_digits_clean_set(per_class=4, seed=1)
    with pytest.raises(CheckpointError, match="holds a run with a different clean_set"):
        purify(model, variables, other_clean, _ft(), 0, progress=False, checkpointing=saving)


def test_a_checkpointing_interval_below_one_is_refused():
    from fippure.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="every"):
        Checkpointing("somewhere", every=0)
