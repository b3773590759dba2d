"""Batched, jitted prediction with a fixed batch shape (the last batch is padded)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fippure.data.catalog import DatasetSpec
from fippure.data.pipeline import normalize, to_unit_range
from fippure.errors import InvalidInputError, NonFiniteLossError
from fippure.models.registry import Variables, output_shape, variables_must_fit


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _logits(model: nn.Module, spec: DatasetSpec, variables: Variables, images: jax.Array):
    return model.apply(variables, normalize(to_unit_range(images), spec), train=False)


def predict_logits(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> np.ndarray:
    """Eval-mode logits of ``images`` (integer pixels 0-255, or floats in [0, 1]), normalised
    with ``spec``.

    The images are padded to whole batches (fewer than a batch: the next power of two), so a
    new number of NumPy images compiles nothing once its bucket has been seen; a jax array of
    a new size compiles its (small) padding program.

    Returns:
        float32 ``(n, K)`` numpy array.

    Raises:
        InvalidInputError: images not of ``spec``'s shape, float images far outside [0, 1]
            (pixel values 0-255 as floats, which would be read as saturated, or [-1, 1]), or
            ``variables`` that are not ``model``'s.
        NonFiniteLossError: the model's logits are NaN or infinite.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size}")
    n = int(np.shape(images)[0]) if hasattr(images, "shape") and np.ndim(images) else 0
    # Fewer images than a batch run in the next power of two (padded), so inputs of many
    # sizes share a few compiled shapes.
    batch_size = max(1, min(int(batch_size), 1 << max(n - 1, 0).bit_length()))
    # on the device once, padded to whole batches (the last row repeated), so that no
    # program is shaped by the number of images: the range check compiles per batch count,
    # and the model per batch size
    images = check_images(images, spec, rows=-(-n // batch_size) * batch_size)
    # on the device once (NumPy weights would be uploaded with every batch)
    variables = jax.device_put(
        {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    )
    if n == 0:  # an empty subset (say, a filtered triggered set): no rows
        return np.zeros((0, *output_shape(model, variables, spec.image_shape)), np.float32)
    batches = images.reshape(-1, batch_size, *images.shape[1:])
    out = []
    for index in range(batches.shape[0]):
        with variables_must_fit(model):  # the first call of a batch shape traces the model
            out.append(_logits(model, spec, variables, batches[index]))
    # to the host batch by batch (a device concatenate and cut would compile per size)
    logits = np.concatenate(jax.device_get(out))[:n]
    if not np.isfinite(logits).all():
        # argmax of NaN logits is class 0, which would score as a perfect backdoor
        raise NonFiniteLossError(
            "the model's logits are NaN or infinite (its weights or BatchNorm statistics "
            "have diverged); no metric can be computed from them"
        )
    return logits


def check_images(
    images: np.ndarray | jax.Array, spec: DatasetSpec, rows: int | None = None
) -> jax.Array:
    """One-line errors for images that ``spec``'s models cannot take (see
    :func:`predict_logits`); returns them as a device array (one transfer, one reduction).

    ``rows``: pad to this many rows, repeating the last (on the host for NumPy images, before
    the one transfer), so the checks and later programs see a size shared by many inputs."""
    expected = (spec.image_shape[0], spec.image_shape[1], spec.image_shape[2])
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise InvalidInputError(
            f"images must be an array (numpy or jax), got {type(images).__name__}"
        )
    if images.dtype == bool or not jnp.issubdtype(images.dtype, jnp.number):
        raise InvalidInputError(f"images must be uint8 or float, got dtype {images.dtype}")
    if np.ndim(images) != 4 or tuple(images.shape[1:]) != expected:
        raise InvalidInputError(
            f"expected {spec.name} images of shape (n, {', '.join(map(str, expected))}), got "
            f"{tuple(np.shape(images))}"
        )
    n = images.shape[0]
    if not n:
        return jnp.asarray(images)
    if rows is not None and rows > n:
        if isinstance(images, jax.Array):
            images = _repeat_last_row(images, rows)
        else:
            images = np.concatenate([images, np.repeat(images[-1:], rows - n, axis=0)])
    images = jnp.asarray(images)
    low, top, finite = (float(v) for v in jax.device_get(value_range(images)))
    if jnp.issubdtype(images.dtype, jnp.floating):
        if not finite:
            raise InvalidInputError("the images hold NaN or infinite values")
        if top > 1.5:
            raise InvalidInputError(
                f"float images are read as [0, 1] but these reach {top:g}; pass uint8 images "
                "or divide by 255"
            )
        if low < -0.5:
            raise InvalidInputError(
                f"float images are read as [0, 1] but these reach {low:g}; images in [-1, 1] "
                "must be mapped to [0, 1] first, (x + 1) / 2"
            )
    if jnp.issubdtype(images.dtype, jnp.integer) and (low < 0 or top > 255):
        raise InvalidInputError(
            f"integer images are read as pixels 0-255 but these span {int(low)}..{int(top)}"
        )
    return images


@functools.partial(jax.jit, static_argnums=1)
def _repeat_last_row(images: jax.Array, rows: int) -> jax.Array:
    return jnp.concatenate([images, jnp.repeat(images[-1:], rows - images.shape[0], axis=0)])


@jax.jit
def value_range(images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(min, max, all finite)`` of an image array in one pass and one transfer."""
    values = images.astype(jnp.float32)
    return jnp.min(values), jnp.max(values), jnp.isfinite(values).all()


def predict(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> np.ndarray:
    """Predicted labels (int32 numpy array) of ``images`` in eval mode."""
    return predict_logits(model, variables, images, spec, batch_size).argmax(-1).astype(np.int32)


def accuracy(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | jax.Array,
    labels: np.ndarray,
    spec: DatasetSpec,
    batch_size: int = 1000,
) -> float:
    """Fraction of ``images`` predicted as ``labels`` (NaN for no images)."""
    labels = np.asarray(labels)
    if labels.shape != (int(np.shape(images)[0]),):
        raise InvalidInputError(f"{labels.shape} labels for {np.shape(images)[0]} images")
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(predict(model, variables, images, spec, batch_size) == labels))
