"""NFT: neural-mask fine-tuning with MixUp (Karim et al., "Augmented Neural Fine-Tuning for
Efficient Backdoor Purification", ECCV 2024), SPEC section 4.

The weights are frozen. One mask per BatchNorm channel inside the residual blocks (shortcut
BNs included; the stem and the head's final BN are not masked), initialised to 1 and held in a
pytree of its own, multiplies that BN's ``gamma`` (:mod:`fippure.optim.masks`). The masks
minimise

    E[ lam * CE(f(x_mix), y_a) + (1 - lam) * CE(f(x_mix), y_b) ] + (eta / N_c) * sum |1 - m|

subject to ``mu(l) <= m <= 1``, ``mu(l) = a * exp(-b * l)`` (exponential by default; constant
and linear floors for the paper's ablation), with MixUp ``x_mix = lam x_a + (1 - lam) x_b``,
``lam ~ Beta(alpha, alpha)`` (alpha = 1), the partner a permutation of the (cropped and
flipped) batch, and ``N_c`` the clean images per class. SGD (lr 0.05, momentum 0.95) over 1000
steps with the learning rate in five constant blocks that follow a cosine from 0.05, floored
at 0.02; the masks are projected onto ``[mu(l), 1]`` after every step
(:func:`fippure.optim.project_box`). BatchNorm statistics re-estimate on D_v (**choice**,
``bn_train``); as they then average MixUp blends, ``final_batch_stats="recompute"`` replaces
them by clean-batch statistics after the last step (``running``, the seed code's, by default;
on the CIFAR-10 zoo recomputing raised ACC by 1-7 points and never raised ASR). The result folds
the masks into ``gamma``; the masks themselves are in ``report.artifacts['masks']``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jaxtyping import PRNGKeyArray

from fippure.config_checks import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    REGEX,
    check_config,
)
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.losses import soft_cross_entropy
from fippure.models.registry import Variables, module_call_order
from fippure.optim.masks import RESIDUAL_BN_PATTERN, apply_masks, init_masks, layer_floors
from fippure.optim.projection import clip_to_box, project_box
from fippure.purify.batch_stats import (
    FinalBatchStats,
    finalise_from_config,
)
from fippure.purify.common import (
    SHARED_RULES,
    Observer,
    PurifyReport,
    apply_model,
    as_variables,
    batchnorm_modules,
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
    steps_taken,
    tree_size,
    validate_clean_set,
)
from fippure.purify.resume import Checkpointing, run_fingerprint

#: Ranges of NFT's hyper-parameters (the mask floor ``mu(l)`` lies in [0, 1]).
NFT_RULES = SHARED_RULES | {
    "lr_floor": NON_NEGATIVE,
    "lr_blocks": AT_LEAST_ONE,
    "eta": NON_NEGATIVE,
    "floor_a": FRACTION,
    "floor_b": NON_NEGATIVE,
    "mixup_alpha": POSITIVE,
    "mask_pattern": REGEX,
}


@dataclasses.dataclass(frozen=True)
class NFTConfig:
    """NFT's hyper-parameters (SPEC section 4, the seed code's defaults).

    Attributes:
        steps: SGD steps on the masks.
        batch_size: clean images per step (capped at the clean-set size).
        learning_rate: initial learning rate.
        schedule: ``blocks`` (five constant blocks following a cosine, floored at
            ``lr_floor``), ``cosine`` or ``constant``.
        lr_floor: the floor of the ``blocks`` schedule, capped at ``learning_rate`` (a rate
            below the floor runs constant at that rate, not at the floor).
        lr_blocks: number of constant blocks.
        momentum: SGD momentum.
        eta: strength of the L1 pull of the masks towards 1 (divided by N_c).
        floor_schedule: ``exponential``, ``linear`` or ``constant`` mask floor mu(l).
        floor_a: ``a`` of mu(l).
        floor_b: ``b`` of mu(l). The linear schedule ``max(a - b l, 0)`` shares it with the
            exponential one; with layers counted from 1, at the defaults only the first masked
            layer then gets a floor (``a - b`` = 0.3, then 0 from layer 2 on), so a linear
            ablation should lower ``floor_b``, e.g. to ``floor_a`` / the number of masked
            layers.
        mixup_alpha: MixUp's Beta(alpha, alpha) parameter.
        mask_pattern: regular expression choosing the masked BatchNorms by module path.
        augment: random crop + flip before MixUp.
        bn_train: the model in train mode: BatchNorm re-estimates its statistics on D_v,
            and Dropout, if any, drops (on the step's ``'dropout'`` stream).
        final_batch_stats: the BatchNorm running statistics returned: ``running`` (an average
            over the last MixUp batches, the seed code's; **choice**), ``recompute`` (the mean
            statistics of ``stats_batches`` augmented clean batches without MixUp) or
            ``transfer`` (the original ones moved by the change measured on D_v; fippure's
            option, :func:`fippure.purify.batch_stats.transfer_batch_stats`).
        stats_batches: clean batches per estimate for ``recompute`` and ``transfer``.
        log_every: host sync interval of the loss log.
    """

    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 0.05
    schedule: Literal["blocks", "cosine", "constant"] = "blocks"
    lr_floor: float = 0.02
    lr_blocks: int = 5
    momentum: float = 0.95
    eta: float = 0.001
    floor_schedule: Literal["exponential", "linear", "constant"] = "exponential"
    floor_a: float = 0.8
    floor_b: float = 0.5
    mixup_alpha: float = 1.0
    mask_pattern: str = RESIDUAL_BN_PATTERN
    augment: bool = True
    bn_train: bool = True
    final_batch_stats: FinalBatchStats = "running"
    stats_batches: int = 20
    log_every: int = 50

    def __post_init__(self):
        check_config(self, NFT_RULES)


def _blocks(config: NFTConfig) -> tuple[float, dict[int, float]]:
    """The ``blocks`` schedule's first rate and ``{first step of a block: its rate over the
    previous block's}``: constant blocks along a cosine, floored at ``lr_floor``."""
    block = max(1, math.ceil(config.steps / config.lr_blocks))
    floor = min(config.lr_floor, config.learning_rate)  # never above the rate asked for
    values = [
        max(floor, config.learning_rate * 0.5 * (1 + math.cos(math.pi * b / config.lr_blocks)))
        for b in range(config.lr_blocks)
    ]
    return values[0], {b * block: values[b] / values[b - 1] for b in range(1, config.lr_blocks)}


def learning_rate_schedule(config: NFTConfig) -> optax.Schedule:
    """The masks' learning rate: NFT's constant blocks along a floored cosine, or others."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, config.steps)
    if config.schedule != "blocks":
        raise InvalidInputError(f"unknown NFT schedule {config.schedule!r}")
    return optax.piecewise_constant_schedule(*_blocks(config))


def learning_rates(config: NFTConfig) -> jax.Array:
    """The learning rate of each of the ``config.steps`` steps (:func:`learning_rate_schedule`,
    to the last bit), as one device vector that the compiled step indexes: a sweep over the
    rate, its floor or its blocks reuses the step and this function's own program."""
    if config.schedule == "cosine":
        return _scheduled_rates(config.learning_rate, (), cosine=True, steps=config.steps)
    if config.schedule == "constant":
        first, scales = config.learning_rate, {}
    elif config.schedule == "blocks":
        first, scales = _blocks(config)
    else:
        raise InvalidInputError(f"unknown NFT schedule {config.schedule!r}")
    return _scheduled_rates(
        first,
        tuple(scales.values()),
        cosine=False,
        steps=config.steps,
        boundaries=tuple(scales),
    )


@functools.partial(jax.jit, static_argnames=("cosine", "steps", "boundaries"))
def _scheduled_rates(first, scales, *, cosine, steps, boundaries=()):
    """optax's cosine decay from ``first`` over ``steps``, or its piecewise-constant schedule
    from ``first`` scaled by ``scales`` at ``boundaries``, at steps ``0 .. steps - 1``. The
    values are traced Python floats, weakly typed like the constants optax compiles in, and
    the arithmetic is optax's."""
    count = jnp.arange(steps, dtype=jnp.int32)
    # a vector of the default float dtype, not weakly typed, for every schedule (the step's
    # arguments keep one signature); multiplying by ones is exact
    ones = jnp.ones((steps,), jnp.result_type(float))
    if cosine:
        return optax.cosine_decay_schedule(first, steps)(count) * ones
    rates = first * ones
    for threshold, scale in zip(boundaries, scales, strict=True):
        indicator = jnp.maximum(0.0, jnp.sign(threshold - count))
        rates = rates * indicator + (1 - indicator) * scale * rates
    return rates


def _optimizer(floors: Any, rates: jax.Array, momentum: float) -> optax.GradientTransformation:
    """SGD on the masks at the step's rate ``rates[count]``, then the projection onto
    ``[mu(l), 1]`` (SPEC section 4)."""
    return optax.chain(
        optax.sgd(lambda count: rates[count], momentum=momentum or None),
        project_box(floors, 1.0),
    )


def mixup_batch(
    x: jax.Array, y: jax.Array, lam: jax.Array, partner: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """MixUp (Zhang et al. 2018) of a batch with its permutation ``partner``: the images
    ``lam x + (1 - lam) x[partner]`` and the soft targets ``lam e_y + (1 - lam) e_y[partner]``
    (SPEC section 4: one ``lam`` per batch)."""
    one_hot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    return lam * x + (1.0 - lam) * x[partner], lam * one_hot + (1.0 - lam) * one_hot[partner]


def nft_objective(
    masks: Any,
    model: nn.Module,
    params: Any,
    stats: Any,
    x_mix: jax.Array,
    targets: jax.Array,
    l1_strength: jax.Array | float,
    bn_train: bool,
    key: jax.Array | None = None,
) -> tuple[jax.Array, tuple[Any, jax.Array, jax.Array]]:
    """NFT's loss in the masks (SPEC section 4): the soft cross-entropy of the masked network
    on the MixUp batch plus ``l1_strength * sum |1 - m|`` (``l1_strength`` = eta / N_c);
    returns ``(loss, (new batch_stats, cross-entropy, L1 norm))``. In train mode the model's
    Dropout, if any, draws from ``key`` (:func:`fippure.purify.common.apply_model`)."""
    logits, new_stats = apply_model(model, apply_masks(params, masks), stats, x_mix, bn_train, key)
    mixup = soft_cross_entropy(logits, targets)
    l1 = sum(jnp.sum(jnp.abs(1.0 - leaf)) for leaf in jax.tree_util.tree_leaves(masks))
    return mixup + l1_strength * l1, (new_stats, mixup, l1)


#: The fields the step never reads (it takes the L1 strength, the floors, the learning rates
#: and the batch size as arguments of their own): left out of its compilation key
#: (:func:`compile_key`), so runs that differ only in them share the compiled step.
_HOISTED = (
    "eta", "floor_schedule", "floor_a", "floor_b", "mask_pattern", "batch_size",
    "learning_rate", "schedule", "lr_floor", "lr_blocks", "final_batch_stats",
    "stats_batches", "log_every",
)  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=("model", "config", "batch_size", "spec", "num_classes"),
    donate_argnums=0,
)
def _nft_step(
    carry, key, images, labels, params, floors, l1_strength, rates, *, model, config,
    batch_size, spec, num_classes,
):  # fmt: skip
    """One NFT step: MixUp cross-entropy of the masked network plus the L1 pull of the masks
    to 1, then the projection; the carry is donated (run_steps hands the step a copy)."""
    masks, stats, opt_state = carry
    batch_key, lam_key, partner_key = jax.random.split(key, 3)
    x, y = sample_clean_batch(batch_key, images, labels, batch_size, spec, config.augment)
    lam = jax.random.beta(lam_key, config.mixup_alpha, config.mixup_alpha, dtype=x.dtype)
    partner = jax.random.permutation(partner_key, x.shape[0])
    x_mix, targets = mixup_batch(x, y, lam, partner, num_classes)
    (loss, (new_stats, mixup, l1)), grads = jax.value_and_grad(nft_objective, has_aux=True)(
        masks, model, params, stats, x_mix, targets, l1_strength, config.bn_train, key
    )
    updates, opt_state = _optimizer(floors, rates, config.momentum).update(grads, opt_state, masks)
    masks = optax.apply_updates(masks, updates)
    return (masks, new_stats, opt_state), {"loss": loss, "mixup_ce": mixup, "l1": l1}


def _batchnorm_masks(variables: Variables, pattern: str) -> dict:
    """Masks of ones for the BatchNorms that ``pattern`` chooses; a model without BatchNorm,
    or a pattern that also chooses other layers with a scale (LayerNorms), is refused."""
    modules = batchnorm_modules(variables)
    if not modules:
        raise InvalidInputError(
            "nft masks BatchNorm channels, but the model has no BatchNorm layer (its variables "
            "hold no batch_stats); use a defense that tunes weights, such as fip or ft"
        )
    try:
        masks = init_masks(variables["params"], pattern)
    except InvalidInputError:
        flat = traverse_util.flatten_dict(variables["params"])
        unmaskable = sorted(
            "/".join(m) for m in modules if m + ("scale",) not in flat or m + ("bias",) not in flat
        )
        if not unmaskable:
            raise
        # init_masks lists the modules with a scale and a bias, so it named none of these
        raise InvalidInputError(
            f"nft masks BatchNorms with a scale and a bias, but {', '.join(unmaskable)} keep "
            "batch_stats without both (use_scale=False or use_bias=False); build them with "
            "both, or use a defense that tunes weights, such as fip or ft"
        ) from None
    others = sorted("/".join(m) for m in traverse_util.flatten_dict(masks) if m not in modules)
    if others:
        raise InvalidInputError(
            f"the mask_pattern {pattern!r} chooses {', '.join(others)}, which keep no "
            "batch_stats; nft masks BatchNorm channels only"
        )
    return masks


@on_the_variables_device
def purify(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: NFTConfig = NFTConfig(),
    key: PRNGKeyArray | None = None,
    *,
    progress: bool = True,
    observer: Observer | None = None,
    observe_every: int = 0,
    checkpointing: Checkpointing | None = None,
) -> tuple[dict, PurifyReport]:
    """NFT; returns ``(variables with masks folded into gamma, report)``."""
    started = time.perf_counter()
    validate_clean_set(clean_set, model, variables)
    variables = device_variables(variables)
    key = defense_arguments("nft", config, NFTConfig, key)
    params, stats0 = variables["params"], variables.get("batch_stats", {})
    masks = _batchnorm_masks(variables, config.mask_pattern)
    # l counts the masked layers in the order the network calls them (SPEC section 4)
    order = module_call_order(model, variables, clean_set.spec.image_shape)
    floors = layer_floors(masks, config.floor_schedule, config.floor_a, config.floor_b, order)
    # on the device once, in the masks' dtype: the steps take them as an argument
    floors = jax.tree_util.tree_map(lambda f, m: jnp.asarray(f, m.dtype), floors, masks)
    per_class = len(clean_set) / clean_set.num_classes  # N_c
    l1_strength = config.eta / per_class
    batch_size = clean_batch_size(config.batch_size, clean_set)
    images, labels = device_clean_set(clean_set)
    # The frozen weights, the clean set, the floors, the L1 strength and the learning rates
    # are arguments, not constants baked into the program, so every run of a configuration on
    # an architecture shares one compiled step.
    rates = learning_rates(config)
    arguments = (params, floors, jnp.float32(l1_strength), rates)
    step = functools.partial(
        _nft_step,
        model=model,
        config=compile_key(config, *_HOISTED),
        batch_size=batch_size,
        spec=clean_set.spec,
        num_classes=clean_set.num_classes,
    )

    def to_variables(carry):
        return as_variables(apply_masks(params, carry[0]), carry[1])

    carry = (masks, stats0, _optimizer(floors, rates, config.momentum).init(masks))
    carry, curve, step_time, observe_time, resumed, done = run_steps(
        lambda c, k: step(c, k, images, labels, *arguments),
        carry,
        steps=config.steps,
        key=key,
        desc="NFT",
        progress=progress,
        log_every=config.log_every,
        observer=observer,
        observe_every=observe_every,
        to_variables=to_variables,
        checkpointing=checkpointing,
        fingerprint=lambda: run_fingerprint("nft", model, config, variables, images, labels, key),
    )
    # project_box's update lands on the box up to one rounding of the addition; the returned
    # masks lie exactly in [mu(l), 1]
    masks = clip_to_box(carry[0], floors, 1.0)
    carry = (masks, *carry[1:])
    out = finalise_from_config(
        steps_taken(config, done), model, variables, to_variables(carry), clean_set, key
    )
    leaves = np.concatenate([np.asarray(m).ravel() for m in jax.tree_util.tree_leaves(masks)])
    report = PurifyReport(
        method="nft",
        config=config_dict(config),
        steps=done,
        wall_time_s=time.perf_counter() - started - observe_time,
        step_time_s=step_time,
        resumed_from_step=resumed,
        tunable_parameters=tree_size(masks),
        batch_size=batch_size,
        loss_curve=curve,
        clean_accuracy=clean_accuracy(model, out, clean_set),
        extra={
            "mask_mean": float(leaves.mean()),
            "mask_min": float(leaves.min()),
            "masks_below_half": int((leaves < 0.5).sum()),
            "clean_per_class": per_class,
            "l1_strength": l1_strength,
        },
        artifacts={"masks": masks},
    )
    return out, report
