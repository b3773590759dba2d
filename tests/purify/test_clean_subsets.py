"""The defender's clean set of a checkpoint: smaller sub-draws stay inside the stored set
(SPEC section 1), and larger requests are refused with the stored size."""

from __future__ import annotations

import numpy as np
import pytest

from fippure.errors import CheckpointError
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
