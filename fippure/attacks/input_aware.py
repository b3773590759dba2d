"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020): every image gets its own trigger from a generator trained with the classifier.

A pattern generator G and a mask generator M map an image x to a pattern G(x) in [0, 1]^c and
a mask m(x) in [0, 1] (one channel); the triggered image is (paper eq. 1)

    B(x) = x + m(x) * (G(x) - x) = (1 - m(x)) x + m(x) G(x).

Training, as in the paper (section 3):

1. *Mask phase* (``mask_epochs``): M alone minimises ``lambda_div * L_div + lambda_norm *
   L_norm``, with the diversity loss L_div = ||x - x'|| / ||m(x) - m(x')|| (eq. 4) over pairs
   of different images, and L_norm = mean(relu(m(x) - mask_density)), which keeps the mask
   sparse. M is then frozen.
2. *Joint phase* (the classifier's epochs): per batch, the poisoned rows of the plan become
   B(x) with the attack label (``ratio`` plays the role of the paper's p_attack), a further
   fraction ``p_cross`` of the other rows becomes a *cross-trigger* example
   x + m(x') (G(x') - x) built from another image x' of the batch with its *true* label (so a
   trigger only works on the image it was made for), and the rest stay clean. One gradient
   step updates the classifier (SGD, :class:`~fippure.training.TrainConfig`) and G (Adam) on
   ``CE + lambda_div * L_div(G)``.

Defaults follow BackdoorBench's CIFAR-10 config (lambda_div 1, lambda_norm 100, mask density
0.032, Adam lr 0.01 for G and M) except the mask phase, 5 epochs instead of 25
**(choice: CPU budget; the mask losses converge within a few epochs)**, and the generators,
which are scaled down (``ConvAutoencoder`` widths 16/32/64 for G and 8/16/32 for M, about
105k parameters together on CIFAR-10) because their parameters are the saved trigger state.
The cross-trigger share is the authors' release's: ``p_cross`` 0.1 of the rows that are not
poisoned (0.09 of a batch at ratio 0.1), whatever the poison ratio. BackdoorBench instead makes
as many cross-trigger rows as poisoned ones, so at ratio 0.01 it has a tenth of ours.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.joint import (
    Phase,
    adam,
    apply_classifier_update,
    classifier_loss,
    run_fingerprint,
    run_phases,
    unit_batch,
)
from fippure.config_checks import AT_LEAST_ONE, BELOW_ONE, FRACTION, NON_NEGATIVE, POSITIVE
from fippure.data.augment import augment
from fippure.data.pipeline import normalize
from fippure.models.generators import ConvAutoencoder
from fippure.models.registry import Variables
from fippure.training import check_classifier, create_train_state, make_optimizer

_EPS = 1e-7


def diversity_loss(
    inputs: Float[Array, "b h w c"],
    others: Float[Array, "b h w c"],
    outputs: Float[Array, "b h w d"],
    other_outputs: Float[Array, "b h w d"],
) -> Float[Array, ""]:
    """Mean over pairs of ||x - x'|| / ||g(x) - g(x')|| (paper eq. 4, with RMS distances).

    As in the authors' code, inputs and patterns are compared as normalised classifier
    inputs and masks as they are, in [0, 1].
    """
    dx = jnp.sqrt(jnp.mean((inputs - others) ** 2, axis=(1, 2, 3)))
    # Under the square root, _EPS**2 keeps the gradient finite when two outputs coincide
    # (d sqrt(u)/du is infinite at u = 0, which turned a collapsed generator into NaNs).
    dg = jnp.sqrt(jnp.mean((outputs - other_outputs) ** 2, axis=(1, 2, 3)) + _EPS**2)
    return jnp.mean(dx / (dg + _EPS))


@dataclasses.dataclass(frozen=True)
class InputAware(Attack):
    """Input-aware dynamic attack; see the module docstring.

    Attributes:
        p_cross: probability that a non-poisoned training example becomes a cross-trigger
            example (true label kept).
        lambda_div: weight of the diversity loss (mask and pattern generators).
        lambda_norm: weight of the mask-sparsity loss.
        mask_density: mask level above which the sparsity loss penalises.
        mask_epochs: epochs of the mask phase, before the classifier's epochs.
        generator_lr: peak Adam learning rate of G.
        generator_schedule: ``"cosine"`` decays G's learning rate to zero over the joint
            phase, as the classifier's does, so that G settles while the classifier
            converges (the authors decay it too, in steps); ``"constant"`` keeps it. With a
            constant rate G keeps moving after the classifier has stopped learning (20
            digits epochs: ASR 0.46 constant, 0.68 cosine) **(choice: cosine)**.
        mask_lr: Adam learning rate of M.
        generator_width: channels of G's first level (then 2x, 4x).
        mask_width: channels of M's first level (then 2x, 4x).
        mask_steepness: slope of the threshold m = (tanh(s (M(x) - 1/2)) + 1) / 2 (20 in the
            authors' code, which makes masks nearly binary).
    """

    name: ClassVar[str] = "input_aware"
    p_cross: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_density: float = 0.032
    mask_epochs: int = 5
    generator_lr: float = 0.01
    generator_schedule: Literal["cosine", "constant"] = "cosine"
    mask_lr: float = 0.01
    generator_width: int = 16
    mask_width: int = 8
    mask_steepness: float = 20.0
    rules: ClassVar = {
        "p_cross": BELOW_ONE,
        "lambda_div": NON_NEGATIVE,
        "lambda_norm": NON_NEGATIVE,
        "mask_density": FRACTION,
        "mask_epochs": NON_NEGATIVE,
        "generator_lr": POSITIVE,
        "mask_lr": POSITIVE,
        "generator_width": AT_LEAST_ONE,
        "mask_width": AT_LEAST_ONE,
        "mask_steepness": POSITIVE,
    }

    def _generators(self, channels: int) -> tuple[nn.Module, nn.Module]:
        w, m = self.generator_width, self.mask_width
        return (
            ConvAutoencoder(channels, (w, 2 * w, 4 * w)),
            ConvAutoencoder(1, (m, 2 * m, 4 * m)),
        )

    def init_state(self, key, spec) -> State:
        pattern_net, mask_net = self._generators(spec.image_shape[-1])
        dummy = jnp.zeros((1, *spec.image_shape), jnp.float32)
        pattern_key, mask_key = jax.random.split(key)
        return {
            "generator": pattern_net.init(pattern_key, dummy)["params"],
            "mask": mask_net.init(mask_key, dummy)["params"],
        }

    def patterns(self, state: State, images: Images) -> Images:
        """G(x) in [0, 1]."""
        pattern_net, _ = self._generators(images.shape[-1])
        raw = pattern_net.apply({"params": state["generator"]}, images)
        return 0.5 * (jnp.tanh(raw) + 1.0)

    def masks(self, state: State, images: Images) -> Float[Array, "b h w 1"]:
        """m(x) in [0, 1], one channel, through the authors' steep threshold (near binary)."""
        _, mask_net = self._generators(images.shape[-1])
        raw = mask_net.apply({"params": state["mask"]}, images)
        return 0.5 * (jnp.tanh(self.mask_steepness * (raw - 0.5)) + 1.0)

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        masks = self.masks(state, images)
        return images + masks * (self.patterns(state, images) - images)

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
        """Mask phase, then the joint phase (see the module docstring); resumable."""
        data, plan, spec = context.train, context.plan, context.spec
        check_classifier(model, variables, data)
        self.check_plan(plan)
        steps_per_epoch = len(data) // config.batch_size
        joint_steps = max(1, steps_per_epoch * config.epochs)
        optimizer = make_optimizer(config, joint_steps)
        generator_lr = (
            optax.cosine_decay_schedule(self.generator_lr, joint_steps)
            if self.generator_schedule == "cosine"
            else self.generator_lr
        )
        pattern_opt, mask_opt = adam(generator_lr), adam(self.mask_lr)
        copy = functools.partial(jax.tree_util.tree_map, jnp.array)  # the steps donate buffers
        carry = {
            "classifier": create_train_state(copy(dict(variables)), optimizer),
            "generator": copy(state["generator"]),
            "generator_opt": pattern_opt.init(state["generator"]),
            "mask": copy(state["mask"]),
            "mask_opt": mask_opt.init(state["mask"]),
        }
        is_poisoned, poison_label = (jnp.asarray(a) for a in plan.dense())
        batch = functools.partial(unit_batch, batch_size=config.batch_size)

        def mask_step(carry, images, labels, permutation, index, key):
            del key
            x, _, _ = batch(images, labels, permutation, index)
            inputs = normalize(x, spec)

            def loss_fn(mask_params):
                masks = self.masks({"mask": mask_params}, x)
                div = diversity_loss(
                    inputs, jnp.roll(inputs, 1, axis=0), masks, jnp.roll(masks, 1, axis=0)
                )
                norm = jnp.mean(jax.nn.relu(masks - self.mask_density))
                loss = self.lambda_div * div + self.lambda_norm * norm
                return loss, (div, norm, jnp.mean(masks))

            (loss, (div, norm, density)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                carry["mask"]
            )
            updates, opt_state = mask_opt.update(grads, carry["mask_opt"], carry["mask"])
            carry = {
                **carry,
                "mask": jax.tree_util.tree_map(jnp.add, carry["mask"], updates),
                "mask_opt": opt_state,
            }
            return carry, {"loss": loss, "diversity": div, "norm": norm, "mask_mean": density}

        def joint_step(carry, images, labels, permutation, index, key):
            cross_key, augment_key = jax.random.split(key)
            x, y, rows = batch(images, labels, permutation, index)
            poisoned = is_poisoned[rows]
            cross = ~poisoned & jax.random.bernoulli(
                cross_key, jnp.float32(self.p_cross), poisoned.shape
            )
            y = jnp.where(poisoned, poison_label[rows], y)
            masks = jax.lax.stop_gradient(self.masks({"mask": carry["mask"]}, x))
            clean_inputs = normalize(x, spec)
            classifier = carry["classifier"]

            def loss_fn(params, generator):
                patterns = self.patterns({"generator": generator}, x)
                other_patterns = jnp.roll(patterns, 1, axis=0)
                backdoor = x + masks * (patterns - x)
                crossed = x + jnp.roll(masks, 1, axis=0) * (other_patterns - x)
                inputs = jnp.where(
                    poisoned[:, None, None, None],
                    backdoor,
                    jnp.where(cross[:, None, None, None], crossed, x),
                )
                if config.augment:
                    inputs = augment(augment_key, inputs, spec.crop_padding, spec.flip)
                ce, (logits, stats) = classifier_loss(
                    model,
                    params,
                    classifier.batch_stats,
                    normalize(inputs, spec),
                    y,
                    config.label_smoothing,
                    key=key,
                )
                div = diversity_loss(
                    clean_inputs,
                    jnp.roll(clean_inputs, 1, axis=0),
                    normalize(patterns, spec),
                    normalize(other_patterns, spec),
                )
                return ce + self.lambda_div * div, (ce, div, logits, stats)

            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
            (loss, (ce, div, logits, stats)), (grads, generator_grads) = grad_fn(
                classifier.params, carry["generator"]
            )
            updates, generator_opt = pattern_opt.update(
                generator_grads, carry["generator_opt"], carry["generator"]
            )
            correct = jnp.argmax(logits, -1) == y
            carry = {
                **carry,
                "classifier": apply_classifier_update(classifier, optimizer, grads, stats),
                "generator": jax.tree_util.tree_map(jnp.add, carry["generator"], updates),
                "generator_opt": generator_opt,
            }
            metrics = {
                "loss": loss,
                "cross_entropy": ce,
                "diversity": div,
                "accuracy": jnp.mean(correct),
                # summed over the epoch, then divided (joint.epoch_means)
                "backdoor_accuracy_correct": jnp.sum(correct & poisoned),
                "backdoor_accuracy_count": jnp.sum(poisoned),
            }
            return carry, metrics

        phases = [
            # compiled by run_phases, with the plan as an argument (not a constant)
            Phase("mask", self.mask_epochs, mask_step, False),
            Phase("joint", config.epochs, joint_step),
        ]
        carry, report = run_phases(
            phases,
            carry,
            data,
            batch_size=config.batch_size,
            seed=config.seed,
            fingerprint=run_fingerprint(self, model, data, config, len(plan.indices)),
            workdir=workdir,
            evaluate=None
            if evaluate is None
            else lambda c: evaluate(c["classifier"].variables(), _trigger_state(c)),
            eval_every=config.eval_every,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
            progress=context.progress,
            desc=f"{self.name} {spec.name}",
        )
        return carry["classifier"].variables(), _trigger_state(carry), report


def _trigger_state(carry: dict[str, Any]) -> State:
    return {"generator": carry["generator"], "mask": carry["mask"]}
