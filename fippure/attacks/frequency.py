"""Pure-JAX frequency transforms for frequency-domain triggers: block DCT and YCrCb colours.

The DCT is the orthonormal DCT-II (as ``scipy.fft.dct(..., norm="ortho")`` and OpenCV's
``cv2.dct``), written as a matrix product so that it is exact, differentiable and jit-able.
"""

from __future__ import annotations

import numpy as np
from jax import numpy as jnp
from jaxtyping import Array, Float

from fippure.errors import InvalidInputError

#: RGB -> YCrCb (ITU-R BT.601, as OpenCV's ``COLOR_RGB2YCrCb``) on [0, 1] values; the chroma
#: channels are offset by 0.5 (128 on the 0..255 scale).
RGB_TO_YCRCB = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.500, -0.418688, -0.081312],
        [-0.168736, -0.331264, 0.500],
    ]
)
_CHROMA_OFFSET = np.array([0.0, 0.5, 0.5])


def dct_matrix(n: int) -> np.ndarray:
    """The ``(n, n)`` orthonormal DCT-II matrix ``D``: ``dct(x) = D @ x``, ``idct(X) = D.T @ X``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _blocks(images: Array, window: int) -> Array:
    b, h, w, c = images.shape
    if h % window or w % window:
        raise InvalidInputError(f"DCT window {window} does not tile {h}x{w} images")
    return images.reshape(b, h // window, window, w // window, window, c)


def block_dct(images: Float[Array, "b h w c"], window: int) -> Float[Array, "b h w c"]:
    """2-D DCT of every ``window x window`` block of every channel (JPEG-style layout)."""
    matrix = jnp.asarray(dct_matrix(window), images.dtype)
    out = jnp.einsum("ki,bpiqjc,lj->bpkqlc", matrix, _blocks(images, window), matrix)
    return out.reshape(images.shape)


def block_idct(coefficients: Float[Array, "b h w c"], window: int) -> Float[Array, "b h w c"]:
    """Inverse of :func:`block_dct`."""
    matrix = jnp.asarray(dct_matrix(window), coefficients.dtype)
    out = jnp.einsum("ki,bpkqlc,lj->bpiqjc", matrix, _blocks(coefficients, window), matrix)
    return out.reshape(coefficients.shape)


def rgb_to_ycrcb(images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
    """[0, 1] RGB -> YCrCb (chroma centred on 0.5)."""
    matrix = jnp.asarray(RGB_TO_YCRCB, images.dtype)
    return images @ matrix.T + jnp.asarray(_CHROMA_OFFSET, images.dtype)


def ycrcb_to_rgb(images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
    """Exact inverse of :func:`rgb_to_ycrcb`."""
    inverse = jnp.asarray(np.linalg.inv(RGB_TO_YCRCB), images.dtype)
    return (images - jnp.asarray(_CHROMA_OFFSET, images.dtype)) @ inverse.T
