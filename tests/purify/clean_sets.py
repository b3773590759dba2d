"""Random clean sets for the defense unit tests (imported by the test modules)."""

from __future__ import annotations

import numpy as np

from fippure.data import get_spec
from fippure.data.sources import ImageDataset


def random_digits_clean_set(per_class: int, seed: int = 0) -> ImageDataset:
    """A clean set of random 8x8 digits-shaped images, ``per_class`` per class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class).astype(np.int32)
    images = rng.integers(0, 256, size=(10 * per_class, 8, 8, 1), dtype=np.uint8)
    return ImageDataset(images, labels, get_spec("digits"), "clean")
