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
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.fit_checkpoints import open_progress
from fippure.attacks.poisoning import attack_targets
from fippure.config_checks import AT_LEAST_ONE, POSITIVE, UNIT_POSITIVE
from fippure.data.pipeline import normalize, to_unit_range
from fippure.errors import InvalidInputError
from fippure.losses import cross_entropy
from fippure.step_inputs import device_indices, step_guard


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
    fit_checkpoint_every: ClassVar[int] = 100
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

    def fit(
        self,
        state: State,
        context: AttackContext,
        *,
        workdir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        stop_after_steps: int | None = None,
    ) -> State:
        """Fits the coarse pattern against ``context.reference`` (jitted Adam, projected).

        Args:
            state: from :meth:`init_state` (the fit starts from a zero pattern).
            context: the attacker's training set and plan, key, clean reference model.
            workdir: saves the coarse pattern and Adam state there every ``checkpoint_every``
                steps and at the end, and resumes from a save of the same fit
                (:mod:`fippure.attacks.fit_checkpoints`); step ``i`` draws its batch from
                ``fold_in(key, i)``, so a resumed fit ends as an uninterrupted one. ``None``:
                nothing is written.
            checkpoint_every: save interval in steps (default :attr:`fit_checkpoint_every`,
                100).
            stop_after_steps: stop (after saving) once this many steps are done, returning
                the partial fit's pattern; for tests and for splitting a long fit.

        Raises:
            InvalidInputError: no reference model, or no image outside the target class.
            CheckpointError: ``workdir`` holds the progress of another fit.
        """
        if context.reference is None:
            raise InvalidInputError("attack lf needs a clean reference model (--reference)")
        model, variables = context.reference
        # on the device once, not with every step (NumPy weights were uploaded at each one)
        variables = jax.device_put(
            {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        )
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
        store = open_progress(self, state, context, workdir, checkpoint_every)
        images = jax.device_put(context.train.images[keep])
        targets = jnp.asarray(
            attack_targets(labels[keep], plan.target, plan.mode, spec.num_classes), jnp.int32
        )
        optimizer = optax.adam(self.learning_rate * self.eps)
        coarse = jnp.zeros(self.coarse_shape(spec.image_shape), jnp.float32)
        opt_state = optimizer.init(coarse)

        def loss_fn(coarse, variables, x, y):
            x = jnp.clip(to_unit_range(x) + self.expand(coarse, h, w), 0.0, 1.0)
            logits = model.apply(variables, normalize(x, spec), train=False)
            return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

        # The reference weights and the training set are arguments, not closed-over constants
        # that XLA would bake into the compiled program; step i's key is fold_in(key, i).
        @jax.jit
        def step(coarse, opt_state, variables, key, i, images, targets):
            rows = jax.random.randint(
                jax.random.fold_in(key, i), (self.batch_size,), 0, images.shape[0], jnp.int32
            )
            grads, hit = jax.grad(loss_fn, has_aux=True)(
                coarse, variables, images[rows], targets[rows]
            )
            updates, opt_state = optimizer.update(grads, opt_state, coarse)
            coarse = jnp.clip(optax.apply_updates(coarse, updates), -self.eps, self.eps)
            return coarse, opt_state, hit

        start = 0
        if store is not None:
            start, (coarse, opt_state) = store.restore((coarse, opt_state))
        stop = self.steps if stop_after_steps is None else min(self.steps, stop_after_steps)
        bar = tqdm(
            total=self.steps,
            initial=start,
            disable=not context.progress,
            desc="lf pattern",
            unit="step",
        )
        try:
            for i, index in zip(range(start, stop), device_indices(start, stop), strict=True):
                with step_guard():
                    coarse, opt_state, hit = step(
                        coarse, opt_state, variables, context.key, index, images, targets
                    )
                bar.update(1)
                done = i + 1
                if done % 50 == 0:
                    bar.set_postfix(fooled=f"{float(hit):.3f}")
                if store is not None and store.due(done, stop):
                    store.save(done, (coarse, opt_state), "the lf fit")
        finally:
            bar.close()
            if store is not None:
                store.close()
        return {"pattern": self.expand(coarse, h, w)}
