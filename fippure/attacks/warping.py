"""Pure-JAX image resampling used by the warping attack: bilinear ``grid_sample`` and bicubic
upsampling of small fields.

Conventions follow ``torch.nn.functional.grid_sample(..., align_corners=True)``, which the
WaNet paper uses: a sampling grid holds ``(x, y)`` pairs in [-1, 1], where -1 and 1 are the
*centres* of the first and last pixels along the width (x) and the height (y). Samples that
fall outside the image read zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def identity_grid(height: int, width: int) -> Float[Array, "h w 2"]:
    """The grid that samples every pixel at its own centre: ``grid[i, j] = (x_j, y_i)``."""
    ys = jnp.linspace(-1.0, 1.0, height)
    xs = jnp.linspace(-1.0, 1.0, width)
    return jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), axis=-1)


def grid_sample(
    images: Float[Array, "b h w c"], grid: Float[Array, "g ho wo 2"]
) -> Float[Array, "b ho wo c"]:
    """Bilinear sampling of ``images`` at ``grid`` (align-corners convention, zero padding).

    Args:
        images: a batch of images.
        grid: ``(x, y)`` sampling positions in [-1, 1]; its leading dimension is the batch
            size or 1 (one grid for every image).

    Returns:
        The sampled images, of the grid's spatial shape.
    """
    _, h, w, _ = images.shape
    shared = grid.shape[0] == 1
    if shared:
        grid = grid[0]
    x = (grid[..., 0] + 1.0) * (w - 1) / 2.0
    y = (grid[..., 1] + 1.0) * (h - 1) / 2.0
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx1, wy1 = x - x0, y - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

    def gather(image, yi, xi):
        valid = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        values = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
        return values * valid[..., None].astype(image.dtype)

    def sample_one(image, x0, y0, wx0, wx1, wy0, wy1):
        return (
            gather(image, y0, x0) * (wy0 * wx0)[..., None]
            + gather(image, y0, x0 + 1) * (wy0 * wx1)[..., None]
            + gather(image, y0 + 1, x0) * (wy1 * wx0)[..., None]
            + gather(image, y0 + 1, x0 + 1) * (wy1 * wx1)[..., None]
        )

    grid_axis = None if shared else 0
    return jax.vmap(sample_one, in_axes=(0,) + (grid_axis,) * 6)(
        images, x0, y0, wx0, wx1, wy0, wy1
    ).astype(images.dtype)


def _cubic_kernel(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (``a = -0.75``, as PyTorch's bicubic mode)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` matrix of bicubic interpolation with aligned corners.

    Output sample ``i`` sits at input coordinate ``i (size_in - 1) / (size_out - 1)``; the
    four taps around it are clamped to the border (PyTorch's ``upsample_bicubic2d``).
    """
    matrix = np.zeros((size_out, size_in), np.float64)
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    for i in range(size_out):
        t = i * scale
        base = math.floor(t)
        frac = t - base
        for offset in (-1, 0, 1, 2):
            weight = float(_cubic_kernel(np.asarray(frac - offset)))
            matrix[i, min(max(base + offset, 0), size_in - 1)] += weight
    return matrix


def upsample_bicubic(
    field: Float[Array, "hi wi c"], height: int, width: int
) -> Float[Array, "h w c"]:
    """Bicubic (aligned-corners) upsampling of a small ``(hi, wi, c)`` field to ``(h, w, c)``."""
    rows = jnp.asarray(bicubic_matrix(field.shape[0], height), field.dtype)
    cols = jnp.asarray(bicubic_matrix(field.shape[1], width), field.dtype)
    return jnp.einsum("hi,ijc,wj->hwc", rows, field, cols)
