"""LF (Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
ICCV 2021): a smooth, low-frequency universal trigger computed against a clean model.

The paper builds a universal adversarial perturbation towards the target class and low-pass
filters it so that the trigger has no high-frequency artefact. Here **(choice)** the
low-frequency constraint is built into the parametrisation: the pattern is a coarse grid
``z`` of ``ceil(h / factor) x ceil(w / factor)`` values per channel, upsampled by cubic
B-spline smoothing, ``delta = B_h z B_w^T``. B-spline weights are non-negative and sum to one,
so ``|delta| <= max |z| <= eps``: the L-inf bound holds exactly and the pattern is smooth
(C2). ``z`` minimises the clean reference model's cross-entropy towards the attack target,

    min_z  E_x CE(f(clip(x + delta(z), 0, 1)), t(y)),   |z|_inf <= eps,

over non-target training images (all images for all-to-all, with t(y) = (y + 1) mod K), with
Adam and projection onto the box after every step. The trigger is ``clip(x + delta, 0, 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.poisoning import attack_targets
from fippure.config_checks import AT_LEAST_ONE, POSITIVE, UNIT_POSITIVE
from fippure.data.pipeline import normalize, to_unit_range
from fippure.errors import InvalidInputError
from fippure.losses import cross_entropy


def _cubic_bspline(u: np.ndarray) -> np.ndarray:
    u = np.abs(u)
    inner = (4.0 - 6.0 * u**2 + 3.0 * u**3) / 6.0
    outer = (2.0 - u) ** 3 / 6.0
    return np.where(u < 1.0, inner, np.where(u < 2.0, outer, 0.0))


def bspline_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` cubic B-spline smoothing-upsampling matrix (aligned corners).

    Rows are non-negative and sum to one (border control points absorb the taps that fall
    outside), so the output is a convex combination of the inputs.
    """
    matrix = np.zeros((size_out, size_in), np.float64)
    if size_in == 1:
        matrix[:, 0] = 1.0
        return matrix
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    for i in range(size_out):
        t = i * scale
        base = math.floor(t)
        for j in range(base - 1, base + 3):
            matrix[i, min(max(j, 0), size_in - 1)] += float(_cubic_bspline(np.asarray(t - j)))
    return matrix


@dataclasses.dataclass(frozen=True)
class LF(Attack):
    """A smooth universal pattern, optimised against a clean reference model.

    Attributes:
        eps: L-inf bound of the pattern in [0, 1] units.
        factor: the pattern has ``ceil(h / factor) x ceil(w / factor)`` degrees of freedom per
            channel (8 x 8 on 32 x 32 images).
        steps: optimisation steps.
        batch_size: images per step (drawn uniformly, with replacement).
        learning_rate: Adam step size, as a fraction of ``eps``.
    """

    name: ClassVar[str] = "lf"
    needs_reference: ClassVar[bool] = True
    eps: float = 0.1
    factor: int = 4
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 0.1
    rules: ClassVar = {
        "eps": UNIT_POSITIVE,
        "factor": AT_LEAST_ONE,
        "steps": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "learning_rate": POSITIVE,
    }

    def coarse_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Shape of the coarse grid ``z``."""
        h, w, c = image_shape
        return math.ceil(h / self.factor), math.ceil(w / self.factor), c

    def expand(self, coarse: Float[Array, "hi wi c"], height: int, width: int) -> Array:
        """The smooth ``(height, width, c)`` pattern of a coarse grid."""
        rows = jnp.asarray(bspline_matrix(coarse.shape[0], height), coarse.dtype)
        cols = jnp.asarray(bspline_matrix(coarse.shape[1], width), coarse.dtype)
        return jnp.einsum("hi,ijc,wj->hwc", rows, coarse, cols)

    def init_state(self, key, spec) -> State:
        """A zero pattern (``fit`` computes the real one)."""
        del key
        return {"pattern": jnp.zeros(spec.image_shape, jnp.float32)}

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        return jnp.clip(images + state["pattern"].astype(images.dtype), 0.0, 1.0)

    def fit(self, state: State, context: AttackContext) -> State:
        if context.reference is None:
            raise InvalidInputError("attack lf needs a clean reference model (--reference)")
        model, variables = context.reference
        variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        spec, plan = context.spec, context.plan
        h, w, _ = spec.image_shape
        labels = np.asarray(context.train.labels)
        keep = (
            np.flatnonzero(labels != plan.target)
            if plan.mode == "all_to_one"
            else np.arange(len(labels))
        )
        if len(keep) == 0:
            raise InvalidInputError("lf found no training image outside the target class")
        images = jax.device_put(context.train.images[keep])
        targets = jnp.asarray(
            attack_targets(labels[keep], plan.target, plan.mode, spec.num_classes), jnp.int32
        )
        optimizer = optax.adam(self.learning_rate * self.eps)
        coarse = jnp.zeros(self.coarse_shape(spec.image_shape), jnp.float32)
        opt_state = optimizer.init(coarse)

        def loss_fn(coarse, x, y):
            x = jnp.clip(to_unit_range(x) + self.expand(coarse, h, w), 0.0, 1.0)
            logits = model.apply(variables, normalize(x, spec), train=False)
            return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

        # The training set is an argument, not a closed-over constant that XLA would bake
        # into the compiled program.
        @jax.jit
        def step(coarse, opt_state, key, images, targets):
            rows = jax.random.randint(key, (self.batch_size,), 0, images.shape[0])
            grads, hit = jax.grad(loss_fn, has_aux=True)(coarse, images[rows], targets[rows])
            updates, opt_state = optimizer.update(grads, opt_state, coarse)
            coarse = jnp.clip(optax.apply_updates(coarse, updates), -self.eps, self.eps)
            return coarse, opt_state, hit

        bar = tqdm(range(self.steps), disable=not context.progress, desc="lf pattern", unit="step")
        for i in bar:
            coarse, opt_state, hit = step(
                coarse, opt_state, jax.random.fold_in(context.key, i), images, targets
            )
            if (i + 1) % 50 == 0:
                bar.set_postfix(fooled=f"{float(hit):.3f}")
        bar.close()
        return {"pattern": self.expand(coarse, h, w)}
