"""SIG (Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption
Without Label Poisoning", ICIP 2019): a clean-label attack with a horizontal sinusoid,

    x'[i, j] = clip(x[i, j] + delta sin(2 pi j f / W), 0, 1),

added to every channel. Only target-class training images are poisoned and they keep their
labels (``clean_label = True``); at test time the same signal is added to other images.
The defaults are BackdoorBench's: delta = 40 on the 0..255 scale and f = 6.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.attacks.base import Attack, Images, State
from fippure.config_checks import POSITIVE, UNIT_POSITIVE


@dataclasses.dataclass(frozen=True)
class SIG(Attack):
    """Adds ``delta * sin(2 pi j f / W)`` (column ``j`` of ``W``) to every pixel, then clips.

    Attributes:
        delta: amplitude of the sinusoid in [0, 1] units (40 / 255).
        frequency: number of periods across the image width (6).
    """

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float = 40.0 / 255.0
    frequency: float = 6.0
    rules: ClassVar = {"delta": UNIT_POSITIVE, "frequency": POSITIVE}  # 0: no trigger

    def signal(self, width: int) -> Float[Array, " w"]:
        """The additive signal of one row (it is the same for every row and channel)."""
        columns = jnp.arange(width, dtype=jnp.float32)
        return self.delta * jnp.sin(2.0 * jnp.pi * columns * self.frequency / width)

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del state, key
        signal = self.signal(images.shape[2]).astype(images.dtype)
        return jnp.clip(images + signal[None, None, :, None], 0.0, 1.0)
