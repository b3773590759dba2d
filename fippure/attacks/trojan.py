"""Trojan (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): a fixed square
"watermark" patch stamped on the image, x' = (1 - alpha m) x + alpha m p.

The paper reverse-engineers the patch's content from a trained model's neurons; following
SPEC section 7, the patch here is a fixed pattern generated from the attack's seed **(choice)**:
a ``size x size`` square whose pixels are independently black or white per channel, so it is a
colourful, high-contrast square, larger than the BadNets patch. All-to-one and all-to-all
variants come from the poisoning plan (``--mode``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp

from fippure.attacks.base import Attack, Images, State
from fippure.config_checks import AT_LEAST_ONE, NON_NEGATIVE, UNIT_POSITIVE
from fippure.errors import InvalidInputError

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


@dataclasses.dataclass(frozen=True)
class Trojan(Attack):
    """A seeded ``size x size`` black-and-white square ``margin`` pixels from a corner.

    Attributes:
        size: side of the square in pixels (5 on 32x32 images).
        margin: distance in pixels between the square and the image border.
        corner: ``bottom_right``, ``bottom_left``, ``top_right`` or ``top_left``.
        alpha: opacity of the square (1 stamps it; less blends it with the image).
    """

    name: ClassVar[str] = "trojan"
    size: int = 5
    margin: int = 1
    corner: Corner = "bottom_right"
    alpha: float = 1.0
    rules: ClassVar = {"size": AT_LEAST_ONE, "margin": NON_NEGATIVE, "alpha": UNIT_POSITIVE}

    def init_state(self, key, spec) -> State:
        h, w, c = spec.image_shape
        if self.size + self.margin > min(h, w):
            raise InvalidInputError(
                f"a {self.size}x{self.size} trojan patch with margin {self.margin} does not fit "
                f"{h}x{w} images"
            )
        pattern = jax.random.bernoulli(key, jnp.float32(0.5), (self.size, self.size, c))
        return {"pattern": pattern.astype(jnp.float32)}

    def region(self, height: int, width: int) -> tuple[slice, slice]:
        """The rows and columns the patch covers in a ``height x width`` image."""
        size, margin = self.size, self.margin
        top = margin if self.corner.startswith("top") else height - margin - size
        left = margin if self.corner.endswith("left") else width - margin - size
        return slice(top, top + size), slice(left, left + size)

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        rows, cols = self.region(images.shape[1], images.shape[2])
        pattern = state["pattern"].astype(images.dtype)
        patch = images[:, rows, cols, :]
        return images.at[:, rows, cols, :].set((1.0 - self.alpha) * patch + self.alpha * pattern)
