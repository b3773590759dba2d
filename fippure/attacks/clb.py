"""Label-consistent backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks",
2019): clean-label poisoning whose target-class images are made hard to classify first.

A clean-label attack keeps the true labels, so the poisoned (target-class) images must be
ones the network cannot fit from their content alone, or it never needs the trigger. Turner
et al. (section 4.2) perturb them adversarially within an L-inf ball,

    x_adv = argmax_{||d||_inf <= eps} L(f_ref(x + d), y)

with projected gradient ascent (PGD) against a reference model, then stamp the trigger: a
3x3 black-and-white pattern in each of the four corners (section 4.3), blended with
``amplitude`` (their "reduced amplitude" variant when below 1). Poisoned training images are
``corners(x_adv)`` with their own labels; the test-time trigger is ``corners(x)``.

:meth:`CLB.fit` runs the PGD (jitted, with a progress bar) against ``context.reference`` on
the planned images and stores them, rounded to uint8 within the eps ball, in the fitted state;
:meth:`CLB.train_backdoored` trains on the training set with those images swapped in, as a
published poisoned dataset would be. The adversarial images are training-only data:
:meth:`CLB.saved_state` drops them, and the trigger needs no state at all.

Defaults: eps 8/255 as in BackdoorBench (which runs 100 PGD steps of 1.5/255 against an
adversarially trained ResNet-18); here 10 steps of 2/255 against the clean reference model
**(choice: CPU budget; 10 steps already reach the eps boundary)**; amplitude 1 as in
BackdoorBench.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.fit_checkpoints import open_progress
from fippure.config_checks import AT_LEAST_ONE, NON_NEGATIVE, UNIT_POSITIVE, interval
from fippure.data.pipeline import normalize, to_unit_range
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.losses import cross_entropy
from fippure.models.registry import Variables
from fippure.step_inputs import step_guard

#: The corner pattern of the top-left corner (1 = white); the other corners mirror it, so
#: the trigger is symmetric about both image axes.
CORNER = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]], np.float32)


def corner_pattern(image_shape: tuple[int, int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, pattern)`` of the four-corner trigger, each ``(h, w, 1)``.

    ``size`` x ``size`` corners; sizes other than 3 use a checkerboard with the same
    top-left value.
    """
    h, w, _ = image_shape
    if 2 * size > min(h, w):
        raise InvalidInputError(f"corner size {size} does not fit twice in a {h}x{w} image")
    corner = CORNER if size == 3 else (np.indices((size, size)).sum(0) % 2 == 0).astype(np.float32)
    mask = np.zeros((h, w, 1), np.float32)
    pattern = np.zeros((h, w, 1), np.float32)
    for rows, cols, block in (
        (slice(0, size), slice(0, size), corner),
        (slice(0, size), slice(w - size, w), corner[:, ::-1]),
        (slice(h - size, h), slice(0, size), corner[::-1, :]),
        (slice(h - size, h), slice(w - size, w), corner[::-1, ::-1]),
    ):
        mask[rows, cols, 0] = 1.0
        pattern[rows, cols, 0] = block
    return mask, pattern


@dataclasses.dataclass(frozen=True)
class CLB(Attack):
    """Label-consistent attack; see the module docstring.

    Attributes:
        eps: L-inf radius of the PGD perturbation in [0, 1] pixel units.
        step_size: PGD step (sign of the gradient times this).
        steps: PGD steps.
        size: side of each corner pattern in pixels.
        amplitude: blend weight of the corner pattern (1 stamps it).
        pgd_batch_size: images per jitted PGD batch.
    """

    name: ClassVar[str] = "clb"
    clean_label: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True
    fit_checkpoint_every: ClassVar[int] = 1
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    size: int = 3
    amplitude: float = 1.0
    pgd_batch_size: int = 256
    rules: ClassVar = {
        "eps": interval(0, 0.5, high_open=True),
        "step_size": NON_NEGATIVE,
        "steps": NON_NEGATIVE,
        "size": AT_LEAST_ONE,
        "amplitude": UNIT_POSITIVE,
        "pgd_batch_size": AT_LEAST_ONE,
    }

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del state, key
        mask, pattern = corner_pattern(tuple(images.shape[1:]), self.size)
        weight = jnp.asarray(self.amplitude * mask, images.dtype)
        return images + weight * (jnp.asarray(pattern, images.dtype) - images)

    def saved_state(self, state: State) -> State:
        return {k: v for k, v in state.items() if k != "adversarial_images"}

    def fit(
        self,
        state: State,
        context: AttackContext,
        *,
        workdir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        stop_after_steps: int | None = None,
    ) -> State:
        """PGD on the planned target-class images against the clean reference model.

        Returns the state with ``adversarial_images``: uint8 ``(num_poisoned, h, w, c)``, in
        the order of ``context.plan.indices``, each within ``eps`` (rounded down to whole
        grey levels) of its original.

        Args:
            state: from :meth:`init_state`.
            context: the attacker's training set and plan, clean reference model.
            workdir: saves the adversarial images done so far there every
                ``checkpoint_every`` PGD batches and at the end, and resumes at the next batch
                from a save of the same fit (:mod:`fippure.attacks.fit_checkpoints`; each
                batch's PGD is independent of the others). ``None``: nothing is written.
            checkpoint_every: save interval in PGD batches of ``pgd_batch_size`` images
                (default :attr:`fit_checkpoint_every`, every batch).
            stop_after_steps: stop (after saving) once this many PGD batches are done,
                returning the images done so far; for tests and for splitting a long fit.

        Raises:
            InvalidInputError: no reference model, or a dirty-label plan.
            CheckpointError: ``workdir`` holds the progress of another fit.
        """
        self.check_plan(context.plan)
        if context.reference is None:
            raise InvalidInputError("clb needs a clean reference model (--reference)")
        model, variables = context.reference
        variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        variables = jax.device_put(variables)  # once, not with every batch
        spec = context.spec
        store = open_progress(self, state, context, workdir, checkpoint_every)
        pgd = jax.jit(self._pgd_fn(model, spec))
        indices = context.plan.indices
        batches = -(-len(indices) // self.pgd_batch_size)
        # the images done so far, in plan order (a fixed shape, so a save restores into it)
        out = np.zeros((len(indices), *context.train.images.shape[1:]), np.uint8)
        start = 0
        if store is not None:
            start, out = store.restore(out)
        stop = batches if stop_after_steps is None else min(batches, stop_after_steps)
        bar = tqdm(
            total=len(indices),
            initial=min(start * self.pgd_batch_size, len(indices)),
            disable=not context.progress,
            desc=f"clb pgd {spec.name}",
            unit="img",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        try:
            for batch in range(start, stop):
                first = batch * self.pgd_batch_size
                rows = indices[first : first + self.pgd_batch_size]
                count = len(rows)
                if count < self.pgd_batch_size < len(indices):
                    # a short last batch is padded to the compiled shape (each image's attack
                    # is independent of the others: the reference runs in eval mode)
                    rows = np.concatenate([rows, np.repeat(rows[-1:], self.pgd_batch_size - count)])
                images, labels = context.train.images[rows], context.train.labels[rows]
                uploaded = jax.device_put((images, labels))  # the batch's one upload
                with step_guard():
                    adversarial = pgd(variables, *uploaded)
                out[first : first + count] = self._quantise(
                    images[:count], np.asarray(adversarial)[:count]
                )
                bar.update(count)
                if store is not None and store.due(batch + 1, stop):
                    store.save(batch + 1, out, "the clb fit")
        finally:
            bar.close()
            if store is not None:
                store.close()
        done = min(max(start, stop) * self.pgd_batch_size, len(indices))
        return {**state, "adversarial_images": out[:done] if done < len(indices) else out}

    def _pgd_fn(self, model: nn.Module, spec) -> Callable:
        def pgd(variables, images, labels):
            x = to_unit_range(images)

            def loss(z):
                logits = model.apply(variables, normalize(z, spec), train=False)
                return cross_entropy(logits, labels)

            z = x
            for _ in range(self.steps):  # a few steps: unrolled (fast on XLA:CPU)
                z = z + self.step_size * jnp.sign(jax.grad(loss)(z))
                z = jnp.clip(jnp.clip(z, x - self.eps, x + self.eps), 0.0, 1.0)
            return z

        return pgd

    def _quantise(self, images: np.ndarray, adversarial: np.ndarray) -> np.ndarray:
        """uint8 images within ``floor(255 eps)`` grey levels of the originals."""
        if images.dtype != np.uint8:
            raise InvalidInputError("clb poisons uint8 training images")
        levels = np.floor(255.0 * self.eps + 1e-6)
        delta = np.clip(np.round(255.0 * adversarial) - images, -levels, levels)
        return np.clip(images + delta, 0, 255).astype(np.uint8)

    def poisoned_dataset(self, state: State, context: AttackContext) -> ImageDataset:
        """The training set with the planned images replaced by their adversarial versions
        (corners not yet stamped: training adds them in-graph)."""
        images = np.array(context.train.images)
        images[context.plan.indices] = np.asarray(state["adversarial_images"])
        return dataclasses.replace(context.train, images=images)

    def train_backdoored(
        self,
        state: State,
        context: AttackContext,
        model: nn.Module,
        variables: Variables,
        config: Any,
        *,
        workdir: str | os.PathLike | None = None,
        evaluate: Callable[[Variables, State], dict[str, float]] | None = None,
    ):
        """Supervised training on :meth:`poisoned_dataset` with the corners stamped in-graph."""
        if "adversarial_images" not in state:
            raise InvalidInputError("clb.train_backdoored needs the state returned by fit")
        context = dataclasses.replace(context, train=self.poisoned_dataset(state, context))
        return super().train_backdoored(
            self.saved_state(state),
            context,
            model,
            variables,
            config,
            workdir=workdir,
            evaluate=evaluate,
        )
