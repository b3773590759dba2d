"""Loading a backdoored checkpoint for a defense: smaller clean sets are drawn from the stored
one (SPEC section 1), larger ones are refused, and so is a checkpoint normalised otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from fippure.errors import CheckpointError, InvalidInputError
from fippure.zoo import load_backdoored


def test_a_smaller_clean_set_is_drawn_from_the_stored_one(digits_badnets_path, digits_badnets):
    small = load_backdoored(digits_badnets_path, clean_size=50)
    assert len(small.clean) == 50
    assert set(small.clean_indices) <= set(digits_badnets.clean_indices)
    assert np.bincount(small.clean.labels, minlength=10).min() >= 5  # class-balanced


@pytest.mark.parametrize("size", [200, 100000])
def test_a_larger_clean_set_names_the_stored_size(digits_badnets_path, digits_badnets, size):
    stored = len(digits_badnets.clean)
    with pytest.raises(CheckpointError, match=f"holds {stored} clean images; cannot draw {size}"):
        load_backdoored(digits_badnets_path, clean_size=size)


def test_a_checkpoint_trained_with_other_normalisation_is_refused(digits_badnets_path, tmp_path):
    import json
    import shutil

    copy = tmp_path / "renormalised"
    shutil.copytree(digits_badnets_path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["normalization"]["mean"] = [0.5 for _ in meta["normalization"]["mean"]]
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained with normalisation mean"):
        load_backdoored(copy)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_sub_draws_seed_must_be_an_integer(digits_badnets_path, seed):
    # -1 was numpy's bare ValueError
    with pytest.raises(InvalidInputError, match="clean_seed must be an integer"):
        load_backdoored(digits_badnets_path, clean_size=50, clean_seed=seed)
