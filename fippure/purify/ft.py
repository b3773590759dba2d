"""FT and FT-SAM: fine-tuning all weights on the clean set (baselines, SPEC section 6).

- FT minimises the cross-entropy on augmented clean batches with SGD (momentum 0.9, weight
  decay 5e-4, lr 0.01 with a cosine decay: BackdoorBench's CIFAR-10 defaults).
- FT-SAM (Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
  Minimization", ICCV 2023) takes the same steps with the adaptive-SAM gradient (Kwon et al.,
  ASAM, ICML 2021: rho 2.0, eta 0.01) and label smoothing 0.1.

BatchNorm runs in train mode, so its statistics re-estimate on D_v.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import optax
from jaxtyping import PRNGKeyArray

from fippure.config_checks import NON_NEGATIVE, check_config
from fippure.data.sources import ImageDataset
from fippure.losses import cross_entropy
from fippure.models.registry import Variables
from fippure.optim.sam import asam_gradient
from fippure.purify.batch_stats import (
    FinalBatchStats,
    finalise_from_config,
)
from fippure.purify.common import (
    SHARED_RULES,
    Observer,
    PurifyReport,
    Schedule,
    apply_model,
    as_variables,
    clean_accuracy,
    clean_batch_size,
    compile_key,
    config_dict,
    defense_arguments,
    device_clean_set,
    device_variables,
    on_the_variables_device,
    run_steps,
    sample_clean_batch,
    scheduled_sgd,
    step_scalars,
    steps_taken,
    tree_size,
    validate_clean_set,
)
from fippure.purify.resume import Checkpointing, run_fingerprint

#: Ranges of FT's and FT-SAM's hyper-parameters.
FT_RULES = SHARED_RULES | {"rho": NON_NEGATIVE, "eta": NON_NEGATIVE}


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """Plain fine-tuning.

    Attributes:
        steps: SGD steps.
        batch_size: clean images per step (capped at the clean-set size).
        learning_rate: initial learning rate.
        schedule: ``cosine`` (decay to 0 over ``steps``) or ``constant``.
        momentum: SGD momentum.
        weight_decay: coupled L2 weight decay.
        label_smoothing: of the cross-entropy (FT-SAM uses 0.1).
        augment: random crop + flip of clean batches.
        bn_train: the model in train mode: BatchNorm re-estimates its statistics on D_v,
            and Dropout, if any, drops (on the step's ``'dropout'`` stream).
        final_batch_stats: the BatchNorm running statistics returned: ``running`` (those the
            train-mode steps left), ``recompute`` (re-estimated on D_v) or ``transfer`` (the
            original ones moved by the change measured on D_v,
            :func:`fippure.purify.batch_stats.transfer_batch_stats`).
        stats_batches: clean batches per estimate for ``recompute`` and ``transfer``.
        log_every: host sync interval of the loss log.
    """

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 0.01
    schedule: Schedule = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    bn_train: bool = True
    final_batch_stats: FinalBatchStats = "running"
    stats_batches: int = 20
    log_every: int = 50

    def __post_init__(self):
        check_config(self, FT_RULES)


@dataclasses.dataclass(frozen=True)
class FTSAMConfig(FTConfig):
    """FT-SAM: FT's settings with the adaptive-SAM gradient.

    Attributes:
        rho: ASAM neighbourhood radius.
        eta: ASAM's ``eta`` in ``T = |theta| + eta``.
        adaptive: ASAM (True) or plain SAM (False).
    """

    label_smoothing: float = 0.1
    rho: float = 2.0
    eta: float = 0.01
    adaptive: bool = True


def _optimizer(config: FTConfig, learning_rate: Any) -> optax.GradientTransformation:
    return scheduled_sgd(
        learning_rate, config.steps, config.schedule, config.momentum, config.weight_decay
    )


#: The fields the step takes as traced arguments (``scalars``) or never reads: left out of its
#: compilation key (:func:`compile_key`), so a sweep over them compiles the step once.
_HOISTED = ("learning_rate", "batch_size", "final_batch_stats", "stats_batches", "log_every")
_HOISTED_SAM = ("rho", "eta")


@functools.partial(
    jax.jit, static_argnames=("model", "config", "batch_size", "spec"), donate_argnums=0
)
def _ft_step(carry, key, images, labels, scalars, *, model, config, batch_size, spec):
    """One step of fine-tuning (FT-SAM: the adaptive-SAM gradient) on a clean batch; the carry
    is donated (run_steps hands the step a private copy). ``scalars`` holds the learning rate
    (and FT-SAM's ``rho`` and ``eta``) as traced scalars."""
    params, stats, opt_state = carry
    x, y = sample_clean_batch(key, images, labels, batch_size, spec, config.augment)

    def loss_fn(p):
        logits, new_stats = apply_model(model, p, stats, x, config.bn_train, key)
        return cross_entropy(logits, y, config.label_smoothing), new_stats

    if isinstance(config, FTSAMConfig):
        (loss, new_stats), grads = asam_gradient(
            loss_fn, params, rho=scalars["rho"], eta=scalars["eta"], adaptive=config.adaptive,
            has_aux=True,
        )  # fmt: skip
    else:
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = _optimizer(config, scalars["learning_rate"]).update(
        grads, opt_state, params
    )
    return (optax.apply_updates(params, updates), new_stats, opt_state), {"loss": loss}


@on_the_variables_device
def purify(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: FTConfig = FTConfig(),
    key: PRNGKeyArray | None = None,
    *,
    progress: bool = True,
    observer: Observer | None = None,
    observe_every: int = 0,
    checkpointing: Checkpointing | None = None,
) -> tuple[dict, PurifyReport]:
    """Fine-tunes every weight on the clean set; returns ``(variables, report)``.

    With an :class:`FTSAMConfig` this is FT-SAM.
    """
    started = time.perf_counter()
    validate_clean_set(clean_set, model, variables)
    variables = device_variables(variables)
    key = defense_arguments("ft", config, (FTConfig, FTSAMConfig), key)
    method = "ft_sam" if isinstance(config, FTSAMConfig) else "ft"
    batch_size = clean_batch_size(config.batch_size, clean_set)
    tx = _optimizer(config, config.learning_rate)
    images, labels = device_clean_set(clean_set)
    sam = isinstance(config, FTSAMConfig)
    scalars = step_scalars(
        learning_rate=config.learning_rate,
        **({"rho": config.rho, "eta": config.eta} if sam else {}),
    )
    # compiled once per architecture and configuration, up to the hoisted fields (model,
    # config and shapes are static)
    step = functools.partial(
        _ft_step,
        model=model,
        config=compile_key(config, *_HOISTED, *(_HOISTED_SAM if sam else ())),
        batch_size=batch_size,
        spec=clean_set.spec,
    )

    params, stats = variables["params"], variables.get("batch_stats", {})

    def to_variables(carry):
        return as_variables(carry[0], carry[1])

    carry = (params, stats, tx.init(params))
    carry, curve, step_time, observe_time, resumed, done = run_steps(
        lambda c, k: step(c, k, images, labels, scalars),
        carry,
        steps=config.steps,
        key=key,
        desc=method.upper().replace("_", "-"),
        progress=progress,
        log_every=config.log_every,
        observer=observer,
        observe_every=observe_every,
        to_variables=to_variables,
        checkpointing=checkpointing,
        fingerprint=lambda: run_fingerprint(method, model, config, variables, images, labels, key),
    )
    out = finalise_from_config(
        steps_taken(config, done), model, variables, to_variables(carry), clean_set, key
    )
    report = PurifyReport(
        method=method,
        config=config_dict(config),
        steps=done,
        wall_time_s=time.perf_counter() - started - observe_time,
        step_time_s=step_time,
        resumed_from_step=resumed,
        tunable_parameters=tree_size(params),
        batch_size=batch_size,
        loss_curve=curve,
        clean_accuracy=clean_accuracy(model, out, clean_set),
    )
    return out, report
