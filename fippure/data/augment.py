"""On-device augmentation, traced inside jit: random crop (zero padding) and horizontal flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.errors import InvalidInputError


def _check_batch(images: Array, what: str) -> None:
    """One-line error for a single image or other non-batch input (a static check)."""
    if getattr(images, "ndim", None) != 4:
        raise InvalidInputError(
            f"{what} takes a batch of images (b, h, w, c), got shape "
            f"{getattr(images, 'shape', None)} (add a leading axis for one image)"
        )


def random_crop(
    key: PRNGKeyArray, images: Float[Array, "b h w c"], padding: int
) -> Float[Array, "b h w c"]:
    """Pads every image with ``padding`` zeros per side and crops a random h x w window.

    Args:
        key: random key of the crop offsets (not used when ``padding`` is 0).
        images: a ``(b, h, w, c)`` batch.
        padding: zeros added on each side, a non-negative integer; 0 returns ``images`` as
            they are.

    Returns:
        The ``(b, h, w, c)`` crops, one independent offset per image.

    Raises:
        InvalidInputError: input that is not a rank-4 batch, or a ``padding`` that is not a
            non-negative integer.
    """
    _check_batch(images, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int | np.integer) or padding < 0:
        raise InvalidInputError(f"padding must be a non-negative integer, got {padding!r}")
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # int32 offsets whether or not jax_enable_x64 is on (an int64 draw takes other bits)
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1, jnp.int32)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], jnp.int32(0)), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: PRNGKeyArray, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """Mirrors each image left-right with probability 1/2.

    Args:
        key: random key of the per-image coin flips.
        images: a ``(b, h, w, c)`` batch.

    Returns:
        The batch, each image mirrored along its width axis or left as it is.

    Raises:
        InvalidInputError: input that is not a rank-4 batch.
    """
    _check_batch(images, "random_flip")
    flip = jax.random.bernoulli(key, jnp.float32(0.5), (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(
    key: PRNGKeyArray, images: Float[Array, "b h w c"], padding: int, flip: bool
) -> Float[Array, "b h w c"]:
    """Random crop with ``padding`` then, if ``flip``, a random horizontal flip.

    Args:
        key: random key, split between the crop and the flip.
        images: a ``(b, h, w, c)`` batch.
        padding: crop padding per side (the dataset's ``crop_padding``); 0 skips the crop.
        flip: whether to flip (the dataset's ``flip``); a Python bool, static under jit.

    Returns:
        The augmented ``(b, h, w, c)`` batch.

    Raises:
        InvalidInputError: as :func:`random_crop`.
    """
    crop_key, flip_key = jax.random.split(key)
    images = random_crop(crop_key, images, padding)
    return random_flip(flip_key, images) if flip else images
