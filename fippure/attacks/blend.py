"""Blend (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017): x' = (1 - alpha) x + alpha p with a fixed pattern p."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fippure.attacks.base import Attack, Images, State
from fippure.config_checks import UNIT_POSITIVE


@dataclasses.dataclass(frozen=True)
class Blend(Attack):
    """Blends every image with one fixed uniform-noise pattern drawn from the attack's seed.

    (The papers blend a Hello-Kitty photo; a seeded noise pattern needs no download.)

    Attributes:
        alpha: blend weight of the pattern (0.2 in BackdoorBench).
    """

    name: ClassVar[str] = "blend"
    alpha: float = 0.2
    rules: ClassVar = {"alpha": UNIT_POSITIVE}  # 0 would be no trigger

    def init_state(self, key, spec) -> State:
        return {"pattern": jax.random.uniform(key, spec.image_shape, jnp.float32)}

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        pattern = state["pattern"].astype(images.dtype)
        return (1.0 - self.alpha) * images + self.alpha * pattern
