"""From uint8 arrays to normalised device batches.

The training loop keeps a dataset on the accelerator when it fits (CIFAR-10 is 150 MB as
uint8) and gathers each batch *inside* the jitted step from a device-resident permutation, so
no host round trip happens per step. Images stay uint8 until the step, where they become
[0, 1] floats (the space triggers are applied in), are augmented, then normalised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from fippure.data.catalog import DatasetSpec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError, is_concrete

#: Datasets larger than this stay on the host and are streamed batch by batch.
DEVICE_BYTES_LIMIT = 2 * 1024**3


def to_unit_range(images: Array) -> Float[Array, "b h w c"]:
    """Integer (uint8, int32, ...) pixels 0..255 -> float32 in [0, 1]; float images are taken
    to be in [0, 1] already.

    Args:
        images: an array of pixel values, any shape (usually ``(b, h, w, c)``).

    Returns:
        A float32 array of the same shape: integers divided by 255, floats only cast.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _check_float_images(images: Array, spec: DatasetSpec, where: str) -> None:
    """One-line errors (on static dtype and shape, so free under ``jit``) for integer pixels,
    whose mean and std would be cast to integers, and for images whose last axes are not the
    dataset's, which the per-channel statistics would broadcast silently."""
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise InvalidInputError(
            f"{where} takes float images in [0, 1], got {jnp.result_type(images)}; convert "
            "integer pixels with to_unit_range first"
        )
    if tuple(jnp.shape(images)[-3:]) != tuple(spec.image_shape):
        raise InvalidInputError(
            f"{where}: images of shape {tuple(jnp.shape(images))} do not end in {spec.name}'s "
            f"{tuple(spec.image_shape)}"
        )


def normalize(images: Float[Array, "b h w c"], spec: DatasetSpec) -> Float[Array, "b h w c"]:
    """[0, 1] images -> per-channel standardised inputs, ``(x - mean) / std``.

    Args:
        images: float images in [0, 1] whose last three axes are the dataset's ``(h, w, c)``.
        spec: the dataset, whose per-channel ``mean`` and ``std`` are used.

    Returns:
        The standardised inputs, with the shape and dtype of ``images``.

    Raises:
        InvalidInputError: integer images (use :func:`to_unit_range` first) or images whose
            ``(h, w, c)`` are not the dataset's.
    """
    _check_float_images(images, spec, "normalize")
    mean = jnp.asarray(spec.mean, images.dtype)
    std = jnp.asarray(spec.std, images.dtype)
    return (images - mean) / std


def denormalize(inputs: Float[Array, "b h w c"], spec: DatasetSpec) -> Float[Array, "b h w c"]:
    """Inverse of :func:`normalize` (with the same checks).

    Args:
        inputs: normalised float inputs whose last three axes are the dataset's ``(h, w, c)``.
        spec: the dataset whose ``mean`` and ``std`` normalised them.

    Returns:
        ``inputs * std + mean`` (images in [0, 1] for inputs from :func:`normalize`), with the
        shape and dtype of ``inputs``.

    Raises:
        InvalidInputError: integer inputs, or inputs whose ``(h, w, c)`` are not the dataset's.
    """
    _check_float_images(inputs, spec, "denormalize")
    return inputs * jnp.asarray(spec.std, inputs.dtype) + jnp.asarray(spec.mean, inputs.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceDataset:
    """A dataset's arrays placed on the default device.

    Attributes:
        images: uint8 ``(n, h, w, c)`` device array.
        labels: int32 ``(n,)`` device array.
        spec: the dataset's :class:`DatasetSpec`.
    """

    images: UInt8[Array, "n h w c"]
    labels: Int[Array, " n"]
    spec: DatasetSpec

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def fits_on_device(dataset: ImageDataset, limit: int = DEVICE_BYTES_LIMIT) -> bool:
    """Whether the uint8 images and labels fit under ``limit`` bytes."""
    return dataset.images.nbytes + dataset.labels.nbytes <= limit


def to_device(dataset: ImageDataset) -> DeviceDataset:
    """Copies a dataset's arrays to the default device once.

    Args:
        dataset: a host :class:`ImageDataset`.

    Returns:
        A :class:`DeviceDataset`: the uint8 images, the labels as int32, the same spec.
    """
    return DeviceDataset(
        jax.device_put(dataset.images),
        jax.device_put(dataset.labels.astype(np.int32)),
        dataset.spec,
    )


def epoch_permutation(key: PRNGKeyArray, epoch: int | Array, n: int) -> Int[Array, " n"]:
    """The example order of one epoch; a pure function of (key, epoch) so runs can resume.

    Args:
        key: the run's data-order key.
        epoch: the epoch number (an int or a traced integer), folded into ``key``.
        n: the number of examples.

    Returns:
        An ``(n,)`` integer array: a permutation of ``0, ..., n - 1``.
    """
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)


def batch_from_permutation(
    images: Array,
    labels: Array,
    permutation: Int[Array, " n"],
    index: Int[Array, ""],
    batch_size: int,
) -> tuple[Array, Int[Array, " b"], Int[Array, " b"]]:
    """The ``index``-th batch of an epoch, gathered on device (use inside jit).

    An epoch has ``len(permutation) // batch_size`` full batches; ``index`` must be below that.
    A concrete ``index`` out of range is refused; a traced one is not checked, and (as
    ``lax.dynamic_slice`` clamps its start) would repeat the epoch's last full batch.

    Args:
        images: the dataset's ``(n, ...)`` images (e.g. a :class:`DeviceDataset`'s).
        labels: the dataset's ``(n,)`` labels.
        permutation: the epoch's example order (:func:`epoch_permutation`).
        index: the batch's position in the epoch, a scalar integer (may be traced).
        batch_size: examples per batch, a static int in ``[1, len(permutation)]``.

    Returns:
        ``(images, labels, example_indices)``: the batch's rows of ``images`` and ``labels``,
        and the ``(batch_size,)`` indices of those rows in the dataset.

    Raises:
        InvalidInputError: a ``batch_size`` outside ``[1, len(permutation)]``, or a concrete
            ``index`` at or past the epoch's number of full batches.
    """
    size = permutation.shape[0]
    if not 1 <= batch_size <= size:
        raise InvalidInputError(
            f"batch_size must be in [1, {size}] (the epoch's size), got {batch_size}"
        )
    if is_concrete(index) and not 0 <= int(index) < size // batch_size:
        raise InvalidInputError(
            f"batch index {int(index)} is out of range: an epoch of {size} examples has "
            f"{size // batch_size} full batches of {batch_size}"
        )
    rows = jax.lax.dynamic_slice_in_dim(permutation, index * batch_size, batch_size)
    return images[rows], labels[rows], rows


def iterate_batches(
    dataset: ImageDataset | DeviceDataset,
    batch_size: int,
    *,
    key: PRNGKeyArray | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[Array, Array]]:
    """Yields ``(uint8 images, labels)`` device batches, shuffled when ``key`` is given.

    Datasets that fit stay on device and batches are sliced there; larger ones are streamed
    from the host with one batch of prefetch.

    Args:
        dataset: a host :class:`ImageDataset` or a :class:`DeviceDataset`.
        batch_size: examples per batch, a positive integer.
        key: random key of the shuffle; ``None`` keeps the dataset's order.
        drop_remainder: leave out the last batch when it is smaller than ``batch_size``.

    Yields:
        ``(images, labels)``: uint8 ``(b, h, w, c)`` images and their ``(b,)`` labels, on the
        default device.

    Raises:
        InvalidInputError: a ``batch_size`` that is not a positive integer (at the first
            ``next``: this is a generator).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size}")
    n = len(dataset)
    order = np.arange(n)
    if key is not None:
        order = np.asarray(jax.random.permutation(key, n))
    stops = range(0, n - batch_size + 1 if drop_remainder else n, batch_size)
    if isinstance(dataset, DeviceDataset) or fits_on_device(dataset):
        data = dataset if isinstance(dataset, DeviceDataset) else to_device(dataset)
        order = jnp.asarray(order)
        for start in stops:
            rows = order[start : start + batch_size]
            yield data.images[rows], data.labels[rows]
        return
    pending = None
    for start in stops:
        rows = order[start : start + batch_size]
        batch = jax.device_put((dataset.images[rows], dataset.labels[rows].astype(np.int32)))
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending
