"""The datasets fippure knows: sizes, normalisation and which augmentations they allow."""

from __future__ import annotations

import dataclasses

from fippure.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one image-classification dataset.

    Attributes:
        name: fippure's name for it (``cifar10``, ``cifar100``, ``gtsrb``, ``digits``).
        num_classes: number of labels K.
        image_shape: ``(height, width, channels)`` of one uint8 image.
        mean: per-channel mean of the [0, 1] images, used for normalisation.
        std: per-channel standard deviation of the [0, 1] images.
        flip: whether horizontal flips are a label-preserving augmentation.
        crop_padding: zero padding for random-crop augmentation (4 on 32x32 images).
        tfds_name: the TFDS builder name, or None for a dataset embedded in a package.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int
    tfds_name: str | None


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        num_classes=10,
        image_shape=(32, 32, 3),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        flip=True,
        crop_padding=4,
        tfds_name="cifar10",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        num_classes=100,
        image_shape=(32, 32, 3),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        flip=True,
        crop_padding=4,
        tfds_name="cifar100",
    ),
    # Traffic signs: flipping changes the meaning of some signs, so no flips.
    "gtsrb": DatasetSpec(
        name="gtsrb",
        num_classes=43,
        image_shape=(32, 32, 3),
        mean=(0.3403, 0.3121, 0.3214),
        std=(0.2724, 0.2608, 0.2669),
        flip=False,
        crop_padding=4,
        tfds_name="gtsrb",
    ),
    # scikit-learn's handwritten digits: 8x8 grey images shipped inside scikit-learn.
    "digits": DatasetSpec(
        name="digits",
        num_classes=10,
        image_shape=(8, 8, 1),
        mean=(0.3053,),
        std=(0.3760,),
        flip=False,
        crop_padding=1,
        tfds_name=None,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the :class:`DatasetSpec` called ``name`` or raises a one-line error.

    Args:
        name: a key of :data:`DATASETS` (``cifar10``, ``cifar100``, ``gtsrb``, ``digits``).

    Returns:
        The dataset's :class:`DatasetSpec`.

    Raises:
        UnknownNameError: for a name that is not in :data:`DATASETS` (or is not hashable).
    """
    try:
        return DATASETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, such as a list
        raise UnknownNameError("dataset", name, DATASETS) from None
