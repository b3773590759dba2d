"""On-device augmentation, traced inside jit: random crop (zero padding) and horizontal flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def random_crop(
    key: PRNGKeyArray, images: Float[Array, "b h w c"], padding: int
) -> Float[Array, "b h w c"]:
    """Pads every image with ``padding`` zeros per side and crops a random h x w window."""
    if padding == 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: PRNGKeyArray, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(
    key: PRNGKeyArray, images: Float[Array, "b h w c"], padding: int, flip: bool
) -> Float[Array, "b h w c"]:
    """Random crop with ``padding`` then, if ``flip``, a random horizontal flip."""
    crop_key, flip_key = jax.random.split(key)
    images = random_crop(crop_key, images, padding)
    return random_flip(flip_key, images) if flip else images
