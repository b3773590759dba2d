"""scikit-learn's handwritten digits, exposed like a TFDS dataset (no download needed).

1,797 grey 8x8 images with values 0..16, rescaled to uint8 0..255. There is no official
test split, so a fixed seeded permutation holds out 360 images (20%) as ``test``.
"""

from __future__ import annotations

import numpy as np

from fippure.data.catalog import get_spec
from fippure.errors import InvalidInputError

TEST_SIZE = 360
_SPLIT_SEED = 0


def load_digits(split: str):
    """The ``train`` (1,437 images) or ``test`` (360 images) split of the digits."""
    from sklearn.datasets import load_digits as sklearn_digits

    from fippure.data.sources import SPLITS, ImageDataset

    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    raw = sklearn_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = raw.target.astype(np.int32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    chosen = order[:TEST_SIZE] if split == "test" else order[TEST_SIZE:]
    chosen = np.sort(chosen)
    return ImageDataset(images[chosen], labels[chosen], get_spec("digits"), split)
