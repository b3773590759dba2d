"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017): a small white square stamped in the bottom-right corner."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from fippure.attacks.base import Attack, Images, State
from fippure.config_checks import AT_LEAST_ONE, FRACTION
from fippure.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class BadNets(Attack):
    """A ``size`` x ``size`` patch of value ``value`` in the bottom-right corner.

    Attributes:
        size: side of the square patch in pixels (3 in BackdoorBench on 32x32 images).
        value: the patch intensity in [0, 1] (1 = white).
    """

    name: ClassVar[str] = "badnets"
    size: int = 3
    value: float = 1.0
    rules: ClassVar = {"size": AT_LEAST_ONE, "value": FRACTION}

    def init_state(self, key, spec) -> State:
        del key
        h, w, _ = spec.image_shape
        if self.size >= min(h, w):
            raise InvalidInputError(
                f"a {self.size}x{self.size} badnets patch would cover the whole {h}x{w} image; "
                f"use size < {min(h, w)}"
            )
        return {}

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del state, key
        return images.at[:, -self.size :, -self.size :, :].set(
            jnp.asarray(self.value, images.dtype)
        )
