"""Small attack-fit setups shared by the fit tests: the digits training split, an untrained
reference model and a poisoning context (a fit needs a fixed model, not a good one)."""

from __future__ import annotations

import jax

from fippure.attacks import AttackContext, make_poison_plan
from fippure.data.sources import ImageDataset
from fippure.models.registry import create_model, init_variables

#: Fit options small enough for a test on digits.
ISSBA = {"num_bits": 8, "fit_steps": 30, "fit_batch_size": 16, "encoder_width": 4}
LF = {"eps": 0.2, "factor": 2, "steps": 40, "batch_size": 32}
CLB = {"size": 2, "pgd_batch_size": 8, "steps": 3}


def untrained_reference(data: ImageDataset):
    """An untrained width-4 ``small_cnn`` and its variables."""
    model = create_model("small_cnn", 10, width=4)
    return model, init_variables(model, jax.random.key(3), data.spec.image_shape)


def poisoned_context(data, reference=None, *, clean_label=False, ratio=0.1, seed=5):
    """An all-to-one (target 0) context over ``data`` without a progress bar."""
    plan = make_poison_plan(
        data.labels, ratio=ratio, num_classes=10, target=0, clean_label=clean_label, seed=0
    )
    return AttackContext(data, plan, data.spec, jax.random.key(seed), reference, progress=False)
