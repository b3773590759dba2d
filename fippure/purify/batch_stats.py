"""Re-estimating BatchNorm statistics on the clean set after a defense ("precise BN").

A defense that runs BatchNorm in train mode leaves running statistics that are an exponential
average over its last few batches. When those batches are not distributed like the test images,
the statistics are off at test time: NFT's MixUp blends have a smaller spread than real images
(SPEC section 4), so its running variances shrink. The remedy is standard (Wu and Johnson,
"Rethinking 'Batch' in BatchNorm", 2021, section 3): with the weights fixed, average the batch
statistics of many clean batches, drawn and augmented as in training, and use that average.

:func:`recompute_batch_stats` does so for any Flax model whose normalisation layers write a
``batch_stats`` collection of the form ``running = m * running + (1 - m) * batch``: it reads each
leaf's momentum ``m`` off the module itself (two evaluations of the first batch, from zero and
from unit running statistics), so it needs no knowledge of the model. The defense only ever sees
the clean set; the test split is not involved.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray

from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.models.registry import Variables
from fippure.purify.common import (
    apply_model,
    clean_batch_size,
    device_clean_set,
    sample_clean_batch,
)


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
        model: the Flax module (applied as ``model.apply(variables, x, train=True)``).
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
    if batches < 1:
        raise InvalidInputError(f"batches must be >= 1, got {batches}")
    size = clean_batch_size(batch_size, clean_set)
    images, labels = device_clean_set(clean_set)
    spec = clean_set.spec
    params = variables["params"]

    def updated(running, x):
        return apply_model(model, params, running, x, train=True)[1]

    @jax.jit
    def estimate(key):
        keys = jax.random.split(key, batches)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, stats0)
        ones = jax.tree_util.tree_map(jnp.ones_like, stats0)
        x0, _ = sample_clean_batch(keys[0], images, labels, size, spec, augment)
        # running' = m * running + (1 - m) * batch, so (from 1) - (from 0) = m per leaf.
        scaled0 = updated(zeros, x0)
        retain = jax.tree_util.tree_map(jnp.subtract, updated(ones, x0), scaled0)

        def add_batch(total, k):
            x, _ = sample_clean_batch(k, images, labels, size, spec, augment)
            return jax.tree_util.tree_map(jnp.add, total, updated(zeros, x)), None

        total, _ = jax.lax.scan(add_batch, scaled0, keys[1:])
        return jax.tree_util.tree_map(
            lambda t, m, old: jnp.where(
                jnp.abs(1.0 - m) > 1e-6, t / (batches * jnp.maximum(1.0 - m, 1e-6)), old
            ),
            total,
            retain,
            stats0,
        )

    return {**variables, "batch_stats": estimate(key)}
