"""BPP (Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022).

The trigger squeezes the colour depth to ``L`` levels per channel (paper, section 4.1):

    x' = round(x (L - 1)) / (L - 1),

optionally with Floyd-Steinberg error diffusion (``dithering``; off by default, as in
BackdoorBench).

**Negative samples** (the paper's contrastive adversarial training; BackdoorBench's
``neg_ratio``): a fraction ``neg_ratio`` of every training batch is replaced by images that
carry *another* image's quantisation residual, ``clip(x + (q(x_r) - x_r), 0, 1)``, and keep
their labels, so the network must detect the exact quantisation rather than any similar
perturbation. BackdoorBench takes the first ``int(neg_ratio * batch)`` non-poisoned rows of a
batch and residuals of random training images. Here **(choice)** each row that the poisoning
plan does not poison becomes a negative with probability ``neg_ratio / (1 - ratio)`` (so the
expected share of the batch is ``neg_ratio``), drawn from the step's key, and ``x_r`` is
another image of the same (already shuffled) batch, picked by a random cyclic shift.
Defaults (BackdoorBench): L = 8, neg_ratio = 0.1.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.poisoning import PoisonPlan
from fippure.config_checks import BELOW_ONE, interval

# Floyd-Steinberg weights: right, below-left, below, below-right.
_RIGHT, _BELOW_LEFT, _BELOW, _BELOW_RIGHT = 7 / 16, 3 / 16, 5 / 16, 1 / 16


def quantize(images: Images, levels: int) -> Images:
    """Rounds [0, 1] values to the nearest of ``levels`` evenly spaced levels."""
    steps = levels - 1
    return jnp.clip(jnp.round(images * steps) / steps, 0.0, 1.0)


def floyd_steinberg(images: Images, levels: int) -> Images:
    """Quantises to ``levels`` levels per channel with Floyd-Steinberg error diffusion.

    The error of each pixel goes 7/16 to its right neighbour and 3/16, 5/16, 1/16 to the
    three pixels below, scanning rows top to bottom and each row left to right; channels are
    dithered independently. The output only holds the ``levels`` levels.
    """
    b, h, w, c = images.shape
    rows = jnp.moveaxis(images, 1, 0)  # (h, b, w, c)

    def scan_row(carry_below, row):
        row = row + carry_below

        def scan_pixel(carry, x):
            right, below = carry  # (b, c), (b, w + 2, c) padded by one on each side
            value = row[:, x] + right
            new = quantize(value, levels)
            error = value - new
            below = below.at[:, x].add(_BELOW_LEFT * error)
            below = below.at[:, x + 1].add(_BELOW * error)
            below = below.at[:, x + 2].add(_BELOW_RIGHT * error)
            return (_RIGHT * error, below), new

        start = (jnp.zeros((b, c), images.dtype), jnp.zeros((b, w + 2, c), images.dtype))
        (_, below), out = jax.lax.scan(scan_pixel, start, jnp.arange(w))
        return below[:, 1:-1], jnp.moveaxis(out, 0, 1)

    _, out = jax.lax.scan(scan_row, jnp.zeros((b, w, c), images.dtype), rows)
    return jnp.moveaxis(out, 0, 1)


@dataclasses.dataclass(frozen=True)
class BPP(Attack):
    """Colour-depth squeezing with negative (residual-carrying, label-kept) training images.

    Attributes:
        squeeze_num: colour levels per channel after squeezing (8).
        dithering: Floyd-Steinberg error diffusion (False).
        neg_ratio: expected share of every training batch turned into negatives (0.1).
    """

    name: ClassVar[str] = "bpp"
    squeeze_num: int = 8
    dithering: bool = False
    neg_ratio: float = 0.1
    rules: ClassVar = {"squeeze_num": interval(2, 256), "neg_ratio": BELOW_ONE}

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del state, key
        if self.dithering:
            return floyd_steinberg(images, self.squeeze_num)
        return quantize(images, self.squeeze_num)

    def negative_probability(self, plan: PoisonPlan) -> float:
        """Probability that a non-poisoned training row is a negative in a step."""
        return min(1.0, self.neg_ratio / (1.0 - plan.ratio))

    def training_transform(self, state: State, plan: PoisonPlan, context: AttackContext):
        del context
        is_poisoned, poison_label = (jnp.asarray(a) for a in plan.dense())
        probability = self.negative_probability(plan)

        def transform(key, images, labels, rows):
            draw_key, pick_key = jax.random.split(key)
            squeezed = self.trigger(state, images)
            poisoned = is_poisoned[rows]
            negative = ~poisoned & jax.random.bernoulli(
                draw_key, jnp.float32(probability), poisoned.shape
            )
            if images.shape[0] == 1:  # no other image to lend a residual: a roll would return
                negative = jnp.zeros_like(negative)  # its own, a poisoned image labelled clean
            # another image of the batch lends its residual (a random non-zero shift)
            shift = jax.random.randint(pick_key, (), 1, max(2, images.shape[0]), jnp.int32)
            residual = jnp.roll(squeezed - images, shift, axis=0)
            negatives = jnp.clip(images + residual, 0.0, 1.0)
            out = jnp.where(negative[:, None, None, None], negatives, images)
            out = jnp.where(poisoned[:, None, None, None], squeezed, out)
            return out, jnp.where(poisoned, poison_label[rows], labels)

        return transform
