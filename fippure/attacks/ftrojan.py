"""FTrojan (Wang et al., "An Invisible Black-box Backdoor Attack through Frequency Domain",
ECCV 2022; arXiv 2021): the trigger lives in the DCT domain of the chroma channels.

RGB images are converted to YCrCb (BT.601), every ``window x window`` block of the chosen
channels is transformed with the orthonormal 2-D DCT, ``magnitude`` is added to the chosen
coefficients (one mid and one high frequency), and the image is transformed back:

    x' = clip(RGB(IDCT(DCT(YCrCb(x)) + magnitude * E)), 0, 1),

where ``E`` is 1 at the chosen (channel, frequency) pairs of every block. The defaults are
BackdoorBench's: the Cr and Cb channels, a 32 x 32 window, frequencies (15, 15) and (31, 31),
magnitude 30 on the 0..255 scale. Because every step is linear, the change is the same
additive pattern for every image (before clipping); its per-pixel size is small
(about 6 / 255 at the defaults).

Grey images (one channel) have no chroma: the coefficients of the only channel are changed
**(choice)**. Where the window exceeds the image (8 x 8 digits), the window shrinks to the
image and the frequencies are scaled with it, ``(p + 1) * window' / window - 1``
**(choice)**; the paper's images are at least 32 x 32.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from fippure.attacks.base import Attack, Images, State
from fippure.attacks.frequency import block_dct, block_idct, rgb_to_ycrcb, ycrcb_to_rgb
from fippure.config_checks import AT_LEAST_ONE, UNIT_POSITIVE
from fippure.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class FTrojan(Attack):
    """Adds ``magnitude`` to chosen block-DCT coefficients of the YCrCb chroma channels.

    Attributes:
        magnitude: the coefficient change in [0, 1] units (30 / 255).
        window: side of the DCT blocks (32).
        frequencies: ``(row, column)`` DCT frequencies changed in every block, for the
            32-pixel window (mid (15, 15) and high (31, 31)).
        channels: YCrCb channels changed (1 = Cr, 2 = Cb); grey images use their only one.
    """

    name: ClassVar[str] = "ftrojan"
    magnitude: float = 30.0 / 255.0
    window: int = 32
    frequencies: tuple[tuple[int, int], ...] = ((15, 15), (31, 31))
    channels: tuple[int, ...] = (1, 2)
    rules: ClassVar = {"magnitude": UNIT_POSITIVE, "window": AT_LEAST_ONE}  # 0: no trigger

    def __post_init__(self):
        super().__post_init__()

        # options may arrive as JSON lists; keep the dataclass hashable
        def whole(v) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        pairs = self.frequencies
        if (
            not isinstance(pairs, list | tuple)
            or not pairs
            or not all(isinstance(f, list | tuple) and all(whole(v) for v in f) for f in pairs)
        ):
            raise InvalidInputError(
                "ftrojan frequencies must be a non-empty list of [row, column] integer pairs, "
                f"e.g. [[15, 15], [31, 31]]; got {pairs!r}"
            )
        if not isinstance(self.channels, list | tuple) or not all(whole(c) for c in self.channels):
            raise InvalidInputError(
                f"ftrojan channels must be a list of integers in 0..2, e.g. [1, 2]; got "
                f"{self.channels!r}"
            )
        object.__setattr__(self, "frequencies", tuple(tuple(int(v) for v in f) for f in pairs))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for f in self.frequencies:
            if len(f) != 2 or not all(0 <= v < self.window for v in f):
                raise InvalidInputError(
                    f"ftrojan frequency {f} is not a (row, column) pair in [0, {self.window})"
                )
        if not self.channels or not all(0 <= c <= 2 for c in self.channels):
            raise InvalidInputError(f"ftrojan channels must be in 0..2, got {self.channels}")

    def layout(self, height: int, width: int, channels: int) -> tuple[int, np.ndarray]:
        """``(window, mask)``: the effective window and the 0/1 coefficient mask of a block
        stack of shape ``(height, width, channels)``."""
        window = min(self.window, height, width)
        if height % window or width % window:
            raise InvalidInputError(f"ftrojan window {window} does not tile {height}x{width}")
        block = np.zeros((window, window, channels), np.float32)
        chosen = list(self.channels) if channels == 3 else list(range(channels))
        for row, col in self.frequencies:
            r = (row + 1) * window // self.window - 1
            c = (col + 1) * window // self.window - 1
            block[max(r, 0), max(c, 0), chosen] = 1.0
        return window, np.tile(block, (height // window, width // window, 1))

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del state, key
        _, h, w, c = images.shape
        window, mask = self.layout(h, w, c)
        colour = c == 3
        x = rgb_to_ycrcb(images) if colour else images
        coefficients = block_dct(x, window) + self.magnitude * jnp.asarray(mask, images.dtype)
        x = block_idct(coefficients, window)
        return jnp.clip(ycrcb_to_rgb(x) if colour else x, 0.0, 1.0)
