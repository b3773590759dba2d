"""WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021):
the trigger is a small, smooth, fixed warp of the image.

A random field ``P`` of ``k x k`` 2-D vectors, uniform in [-1, 1] and normalised by its mean
absolute value, is upsampled bicubically to ``h x w``. The backdoor warp (paper, eq. 4) is

    M = clip((identity + s P / h) * grid_rescale, -1, 1),    x' = grid_sample(x, M),

with bilinear sampling (:func:`fippure.attacks.warping.grid_sample`). The x displacements
are divided by the width and the y ones by the height (the paper divides both by the height
of its square images).

**Noise mode** (paper, section 3.3): while training, "cross" images are warped by ``M`` plus a
random per-image perturbation ``U(-1, 1) / h`` and *keep* their labels, so that the network
learns the exact warp rather than any warp. The paper draws ``cross_ratio`` times as many cross
images as poisoned ones in every batch. Here **(choice)** each batch row that the poisoning
plan does not poison becomes a cross image with probability
``cross_ratio * n_poisoned / n_clean``, drawn from the step's key: the expected count matches
the paper's, the rows differ from step to step as in the paper, and a resumed run draws the
same rows (keys are functions of the step).

The paper also trains with random crops (5 px) and rotations (10 degrees); fippure's training
loop applies its standard random crop (4 px padding) and flip after poisoning and has no
rotation **(choice)**. Defaults (BackdoorBench): k = 4, s = 0.5, grid_rescale = 1,
cross_ratio = 2.

The warp interpolates between pixels, so its output lies off the 8-bit grid, and BackdoorBench
(and fippure by default) scores it in floating point. Images that are stored or sent as 8-bit
files lose part of the trigger: on the zoo's WaNet model, rounding the triggered test images
to 8 bits lowered ASR from 0.904 to 0.857 (``experiments/results/quantised_asr.md``).
``quantise=True`` rounds the backdoor and cross images to the 8-bit grid, in training and at
test time, so the model learns the trigger as an 8-bit image carries it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.poisoning import PoisonPlan
from fippure.attacks.warping import grid_sample, identity_grid, upsample_bicubic
from fippure.config_checks import NON_NEGATIVE, POSITIVE, at_least
from fippure.errors import InvalidInputError


def _grid_dtype(images: Images) -> jnp.dtype:
    """The sampling grid's dtype: at least float32. A bfloat16 grid cannot hold a 32-pixel
    image's positions (s = 0 moved pixels by up to 38 grey levels); the warped images still
    come back in the images' dtype."""
    return jnp.promote_types(images.dtype, jnp.float32)


@dataclasses.dataclass(frozen=True)
class WaNet(Attack):
    """A fixed random warp; noise-mode training with cross images.

    Attributes:
        k: side of the random control field (4).
        s: strength of the warp (0.5).
        grid_rescale: scale of the whole warped grid before clipping (1).
        cross_ratio: cross (noise-warped, label-kept) images per poisoned image in training (2).
        quantise: round warped images to the 8-bit grid (``round(255 x) / 255``), so the
            trigger survives storage as 8-bit images (``False``, BackdoorBench's float images).
    """

    name: ClassVar[str] = "wanet"
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    quantise: bool = False
    rules: ClassVar = {
        "k": at_least(2),
        "s": NON_NEGATIVE,
        "grid_rescale": POSITIVE,
        "cross_ratio": NON_NEGATIVE,
    }

    def init_state(self, key, spec) -> State:
        h, w, _ = spec.image_shape
        if self.k > min(h, w):  # a finer field than the image would be sampled away
            raise InvalidInputError(
                f"wanet k={self.k} exceeds the {h}x{w} image; the control field must be "
                "coarser than the image (k <= min(height, width); WaNet uses 4)"
            )
        field = jax.random.uniform(key, (self.k, self.k, 2), jnp.float32, -1.0, 1.0)
        field = field / jnp.mean(jnp.abs(field))
        return {"noise_grid": upsample_bicubic(field, h, w)}

    def warp_grid(self, state: State) -> Float[Array, "h w 2"]:
        """The backdoor's sampling grid ``M`` (in [-1, 1])."""
        noise = state["noise_grid"]
        h, w, _ = noise.shape
        offset = self.s * noise / jnp.asarray([w, h], noise.dtype)
        return jnp.clip((identity_grid(h, w) + offset) * self.grid_rescale, -1.0, 1.0)

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        grid = self.warp_grid(state).astype(_grid_dtype(images))
        return self._finish(grid_sample(images, grid[None]))

    def _finish(self, warped: Images) -> Images:
        """Clipped to [0, 1] and, with ``quantise``, rounded to the 8-bit grid."""
        warped = jnp.clip(warped, 0.0, 1.0)
        return jnp.round(warped * 255.0) / 255.0 if self.quantise else warped

    def cross(self, state: State, images: Images, key) -> Images:
        """Noise-mode images: the backdoor warp plus a random per-image perturbation."""
        b, h, w, _ = images.shape
        dtype = _grid_dtype(images)
        grid = self.warp_grid(state).astype(dtype)
        noise = jax.random.uniform(key, (b, h, w, 2), dtype, -1.0, 1.0)
        noise = noise / jnp.asarray([w, h], dtype)
        return self._finish(grid_sample(images, jnp.clip(grid[None] + noise, -1.0, 1.0)))

    def cross_probability(self, plan: PoisonPlan) -> float:
        """Probability that a non-poisoned training row is a cross image in a step."""
        clean = plan.num_examples - len(plan.indices)
        return min(1.0, self.cross_ratio * len(plan.indices) / clean) if clean else 0.0

    def training_transform(self, state: State, plan: PoisonPlan, context: AttackContext):
        del context
        is_poisoned, poison_label = (jnp.asarray(a) for a in plan.dense())
        probability = self.cross_probability(plan)

        def transform(key, images, labels, rows):
            draw_key, noise_key = jax.random.split(key)
            poisoned = is_poisoned[rows]
            crossed = ~poisoned & jax.random.bernoulli(
                draw_key, jnp.float32(probability), poisoned.shape
            )
            out = jnp.where(
                crossed[:, None, None, None], self.cross(state, images, noise_key), images
            )
            out = jnp.where(poisoned[:, None, None, None], self.trigger(state, images), out)
            return out, jnp.where(poisoned, poison_label[rows], labels)

        return transform
