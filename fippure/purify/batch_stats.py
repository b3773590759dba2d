"""Re-estimating BatchNorm statistics on the clean set after a defense ("precise BN").

A defense that runs BatchNorm in train mode leaves running statistics that are an exponential
average over its last few batches. When those batches are not distributed like the test images,
the statistics are off at test time: NFT's MixUp blends have a smaller spread than real images
(SPEC section 4), so its running variances shrink. The remedy is standard (Wu and Johnson,
"Rethinking 'Batch' in BatchNorm", 2021, section 3): with the weights fixed, average the batch
statistics of many clean batches, drawn and augmented as in training, and use that average.
:func:`transfer_batch_stats` instead keeps the original model's statistics and moves them by
the change the defense made, as measured on the clean set; :func:`finalise_batch_stats` picks
one of these for a defense's ``final_batch_stats`` option.

:func:`recompute_batch_stats` does so for any Flax model whose normalisation layers write a
``batch_stats`` collection of the form ``running = m * running + (1 - m) * batch``: it reads each
leaf's momentum ``m`` off the module itself (evaluations of the first batch from different
running statistics), so it needs no knowledge of the model. The defense only ever sees
the clean set; the test split is not involved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict
from jaxtyping import PRNGKeyArray

from fippure.data.catalog import DatasetSpec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.models.registry import Variables
from fippure.purify.common import (
    apply_model,
    clean_batch_size,
    device_clean_set,
    on_the_variables_device,
    sample_clean_batch,
)


@on_the_variables_device
def recompute_batch_stats(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    key: PRNGKeyArray,
    *,
    batches: int = 20,
    batch_size: int = 128,
    augment: bool = True,
) -> dict[str, Any]:
    """``variables`` with ``batch_stats`` replaced by the mean batch statistics on the clean set.

    Args:
        model: the Flax module (applied as ``model.apply(variables, x, train=True)``, its
            Dropout, if any, drawing from ``key``, as in training).
        variables: its variables; ``params`` are used as they are.
        clean_set: the defender's clean set.
        key: draws the batches and their augmentation.
        batches: clean batches averaged.
        batch_size: images per batch (capped at the clean-set size).
        augment: random crop + flip, as the model was trained with.

    Returns:
        New variables; a model without ``batch_stats`` is returned unchanged.
    """
    stats0 = variables.get("batch_stats")
    if not stats0:
        return dict(variables)
    stats0 = flax.core.unfreeze(stats0)  # as apply returns them (a FrozenDict would not match)
    if batches < 1:
        raise InvalidInputError(f"batches must be >= 1, got {batches}")
    size = clean_batch_size(batch_size, clean_set)
    images, labels = device_clean_set(clean_set)
    spec = clean_set.spec
    try:
        estimate = _mean_batch_statistics(model, spec, size, batches, augment)
    except TypeError:  # an unhashable module: compiled for this call only
        estimate = _mean_batch_statistics.__wrapped__(model, spec, size, batches, augment)
    stats = estimate(variables["params"], stats0, images, labels, key)
    return {**variables, "batch_stats": stats}


@functools.lru_cache(maxsize=32)
def _mean_batch_statistics(
    model: nn.Module, spec: DatasetSpec, size: int, batches: int, augment: bool
) -> Callable:
    """The jitted estimate ``(params, stats0, images, labels, key) -> mean batch statistics``.

    The weights, statistics and clean set are arguments, so one compiled function serves every
    call with the same shapes (a transfer's two estimates, repeated defenses)."""

    # each batch's Dropout, if the model has any, draws from that batch's key: the three
    # updates of the first batch see one mask, so they measure one batch statistic
    def updated(params, running, x, k):
        return apply_model(model, params, running, x, True, k)[1]

    @jax.jit
    def estimate(params, stats0, images, labels, key):
        keys = jax.random.split(key, batches)
        # the updates and their sum in at least float32 (apply_model keeps the dtype of the
        # statistics it is given): a bfloat16 (1 + m) s puts 0.004 on m, and 1 / (1 - m)
        # makes that a 5% error in the estimate
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), stats0
        )
        ones = jax.tree_util.tree_map(jnp.ones_like, zeros)
        x0, _ = sample_clean_batch(keys[0], images, labels, size, spec, augment)
        scaled0 = updated(params, zeros, x0, keys[0])
        retain = _retained_fraction(
            scaled0, updated(params, scaled0, x0, keys[0]), updated(params, ones, x0, keys[0])
        )

        def add_batch(total, k):
            x, _ = sample_clean_batch(k, images, labels, size, spec, augment)
            return jax.tree_util.tree_map(jnp.add, total, updated(params, zeros, x, k)), None

        total, _ = jax.lax.scan(add_batch, scaled0, keys[1:])
        return jax.tree_util.tree_map(
            lambda t, m, old: jnp.where(
                jnp.abs(1.0 - m) > 1e-6, t / (batches * jnp.maximum(1.0 - m, 1e-6)), old
            ).astype(old.dtype),
            total,
            retain,
            stats0,
        )

    return estimate


def _retained_fraction(from_zero: Any, from_itself: Any, from_one: Any) -> Any:
    """Each leaf's momentum ``m`` from three updates of the same batch statistic ``b``.

    ``running' = m * running + (1 - m) * b``, so from 0 it is ``s = (1 - m) b``, from ``s``
    itself ``(1 + m) s`` and from 1 it is ``m + (1 - m) b``. The ratio ``(from s - s) / s`` gives
    ``m`` to float precision whatever the size of ``b``; ``(from 1) - (from 0)`` cancels
    catastrophically once ``(1 - m) b`` is large (a variance of 6.5e6 read 0.9 as 0.875), so it is
    used only where ``s`` is 0 (``b = 0`` or ``m = 1``), where it is exact.
    """

    def fraction(s, s_itself, s_one):
        usable = jnp.abs(s) > 1e-30
        ratio = (s_itself - s) / jnp.where(usable, s, 1.0)
        return jnp.where(usable, ratio, s_one - s)

    return jax.tree_util.tree_map(fraction, from_zero, from_itself, from_one)


def transfer_batch_stats(
    model: nn.Module,
    original: Variables,
    purified: Variables,
    clean_set: ImageDataset,
    key: PRNGKeyArray,
    *,
    batches: int = 20,
    batch_size: int = 128,
    augment: bool = True,
) -> dict[str, Any]:
    """``purified`` with the original running statistics moved by the change the defense made.

    The original model's running statistics were estimated during training, on tens of
    thousands of images; a defense has only the clean set D_v. Rather than replace them by a
    D_v estimate (:func:`recompute_batch_stats`), this keeps them and applies only the change
    that the new weights cause, measured on D_v. Per BatchNorm channel, with ``m_v``/``v_v``
    the mean/variance estimated on D_v under the original (0) and purified weights:

        mean = mean0 + m_v(purified) - m_v(original),   var = var0 * v_v(purified) / v_v(original)

    Both D_v estimates use the same batches and augmentations (the same ``key``), so their
    sampling errors largely cancel (a control variate). With unchanged weights it returns the
    original statistics. This is a fippure option, not part of any of the papers' methods;
    ``experiments/results/purify_cifar10_w16.md`` measures it on the zoo.

    Args:
        model: the Flax module.
        original: the variables before the defense (their ``batch_stats`` are kept as base).
        purified: the variables after it; their ``params`` are returned unchanged.
        clean_set: the defender's clean set.
        key: draws the batches and their augmentation (shared by both estimates).
        batches, batch_size, augment: of each estimate, as in :func:`recompute_batch_stats`.

    Returns:
        New variables; ``purified`` unchanged for a model without ``batch_stats``.
    """
    stats0 = original.get("batch_stats")
    if not stats0:
        return dict(purified)
    flat0 = flatten_dict(stats0)
    if set(flat0) != set(flatten_dict(purified.get("batch_stats") or {})):
        raise InvalidInputError(
            "the purified variables' batch_stats do not match the original model's; pass the "
            "variables of the same model before and after the defense"
        )
    unknown = sorted("/".join(path) for path in flat0 if path[-1] not in ("mean", "var"))
    if unknown:
        raise InvalidInputError(
            f"transfer_batch_stats knows BatchNorm 'mean' and 'var' statistics, not {unknown}"
        )
    options = dict(batches=batches, batch_size=batch_size, augment=augment)
    before = flatten_dict(
        recompute_batch_stats(model, original, clean_set, key, **options)["batch_stats"]
    )
    after = flatten_dict(
        recompute_batch_stats(model, purified, clean_set, key, **options)["batch_stats"]
    )
    moved = {
        path: (
            value + after[path] - before[path]
            if path[-1] == "mean"
            else value * _variance_ratio(after[path], before[path])
        )
        for path, value in flat0.items()
    }
    return {**purified, "batch_stats": unflatten_dict(moved)}


def _variance_ratio(after: jax.Array, before: jax.Array) -> jax.Array:
    """after / before per channel; 1 where the channel is (numerically) constant on D_v under
    the original weights, so that its original variance is kept."""
    safe = before > 1e-12
    return jnp.where(safe, after / jnp.where(safe, before, 1.0), 1.0)


#: What a defense does with the BatchNorm running statistics after its last step (the type of
#: the ``final_batch_stats`` config fields, and the tuple of its values).
FinalBatchStats = Literal["running", "recompute", "transfer"]
FINAL_BATCH_STATS = get_args(FinalBatchStats)


def check_final_batch_stats(mode: str, batches: int) -> None:
    """The config check behind a defense's ``final_batch_stats`` and ``stats_batches``."""
    if mode not in FINAL_BATCH_STATS:
        raise InvalidInputError(
            f"unknown final_batch_stats {mode!r}; use one of {', '.join(FINAL_BATCH_STATS)}"
        )
    if batches < 1:
        raise InvalidInputError(f"stats_batches must be >= 1, got {batches}")


def finalise_batch_stats(
    mode: str,
    model: nn.Module,
    original: Variables,
    purified: Variables,
    clean_set: ImageDataset,
    key: PRNGKeyArray,
    **options: Any,
) -> dict[str, Any]:
    """Applies a defense's ``final_batch_stats`` option to its result.

    ``running`` keeps the running statistics the defense's train-mode steps left (an average
    over its last few clean batches), ``recompute`` replaces them by a D_v estimate
    (:func:`recompute_batch_stats`), ``transfer`` moves the original ones by the change
    measured on D_v (:func:`transfer_batch_stats`).
    """
    check_final_batch_stats(mode, options.get("batches", 1))
    if mode == "recompute":
        return recompute_batch_stats(model, purified, clean_set, key, **options)
    if mode == "transfer":
        return transfer_batch_stats(model, original, purified, clean_set, key, **options)
    return dict(purified)


def finalise_from_config(
    config: Any,
    model: nn.Module,
    original: Variables,
    purified: Variables,
    clean_set: ImageDataset,
    key: PRNGKeyArray,
) -> dict[str, Any]:
    """:func:`finalise_batch_stats` with a defense config's own options.

    Reads ``final_batch_stats``, ``stats_batches``, ``batch_size`` and ``augment`` off
    ``config``; the batches are drawn from ``fold_in(key, config.steps)``, a stream that the
    defense's training steps never use.
    """
    return finalise_batch_stats(
        config.final_batch_stats,
        model,
        original,
        purified,
        clean_set,
        jax.random.fold_in(key, config.steps),
        batches=config.stats_batches,
        batch_size=config.batch_size,
        augment=config.augment,
    )
