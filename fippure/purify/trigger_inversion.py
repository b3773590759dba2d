"""Trigger inversion on the clean set: a defender's own estimate of a backdoor (Neural Cleanse).

SPEC section 1 forbids choosing a defense's threshold or stop on test data; where a choice needs
a trigger, the defender synthesises one from D_v. This module does that as Neural Cleanse does
(Wang et al., S&P 2019, Eq. 2-3): for a candidate target class t it finds the smallest mask m
and a pattern p whose stamp

    x' = (1 - m) * x + m * p,        m in [0, 1]^(H x W),  p in [0, 1]^(H x W x C)

sends clean images of other classes to t,

    min_{m, p}  mean_x CE(f(x'), t) + lambda * ||m||_1,

with lambda adapted during the run (raised while the stamp succeeds on at least
``success_threshold`` of a batch, lowered otherwise). A backdoor's target needs a much smaller
mask than any other class; the median-absolute-deviation anomaly index (NC section IV.C) flags
classes whose mask norm lies more than ``anomaly_threshold`` below the median.

The synthesized trigger then gives a clean-set-only proxy of the attack success rate
(:func:`synthesized_asr`), and re-inverting a purified model towards the flagged class tells
whether a small trigger still exists there. Everything runs on D_v; no test data.

The optimisation of one class is one jitted ``lax.scan`` (no host round trip per step); the
model stays in eval mode, and its variables are never changed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.config_checks import AT_LEAST_ONE, POSITIVE, UNIT_POSITIVE, Rule, check_config
from fippure.data.catalog import DatasetSpec
from fippure.data.pipeline import normalize, to_unit_range
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError, NonFiniteLossError
from fippure.inference import predict
from fippure.models.registry import Variables
from fippure.purify.common import as_key, clean_batch_size, validate_clean_set

#: Consistency constant that makes the MAD estimate a normal distribution's standard deviation.
MAD_CONSISTENCY = 1.4826

INVERSION_RULES: dict[str, Rule] = {
    "steps": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "init_cost": POSITIVE,
    "cost_multiplier": (lambda v: v > 1, "> 1"),
    "adapt_every": AT_LEAST_ONE,
    "success_threshold": UNIT_POSITIVE,
    "anomaly_threshold": POSITIVE,
}


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """Neural Cleanse's optimisation (NC section IV.B; Adam as in its released setting).

    Attributes:
        steps: Adam steps per candidate class (**choice**: 300 here; NC runs epochs over its
            clean set, thousands of steps at GPU scale).
        batch_size: clean images per step (capped at the clean-set size).
        learning_rate: Adam's rate, with betas (0.5, 0.9).
        init_cost: the starting weight lambda of the mask's L1 norm (in pixels).
        cost_multiplier: lambda is multiplied by this after a window whose mean batch success
            reached ``success_threshold``, and divided by its 1.5th power otherwise.
        adapt_every: steps per window of that adaptation.
        success_threshold: the fraction of stamped non-target images that must reach t for a
            trigger to count (and to be kept as the best so far).
        anomaly_threshold: a class is flagged when its mask norm lies more than this many
            MAD-standard-deviations below the median over classes (NC: 2).
    """

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    adapt_every: int = 10
    success_threshold: float = 0.99
    anomaly_threshold: float = 2.0

    def __post_init__(self):
        check_config(self, INVERSION_RULES)


@dataclasses.dataclass(frozen=True, eq=False)
class InvertedTrigger:
    """A synthesized trigger for one target class.

    Attributes:
        target: the class it sends images to.
        mask: ``(H, W, 1)`` float32 in [0, 1].
        pattern: ``(H, W, C)`` float32 in [0, 1] (image space, before normalisation).
        mask_l1: the mask's L1 norm, in pixels.
        success: fraction of the clean set's non-target images that the stamp sends to
            ``target`` (measured on the images it was optimised on).
        reached_threshold: whether any step's batch reached ``success_threshold`` (otherwise
            the trigger is the last iterate).
    """

    target: int
    mask: np.ndarray
    pattern: np.ndarray
    mask_l1: float
    success: float
    reached_threshold: bool

    def stamp(self, images: np.ndarray | Array) -> Array:
        """``(1 - m) x + m p`` for images of pixels 0-255 or floats in [0, 1]; floats in
        [0, 1]."""
        images = jnp.asarray(images)
        h, w, c = np.shape(self.pattern)
        if images.ndim != 4 or tuple(images.shape[1:]) != (h, w, c):
            raise InvalidInputError(
                f"a {h}x{w}x{c} trigger stamps a batch of shape (n, {h}, {w}, {c}), got "
                f"{tuple(images.shape)}"
            )
        return stamp(to_unit_range(images), self.mask, self.pattern)


def check_trigger(trigger: Any, spec: DatasetSpec, num_classes: int | None = None) -> None:
    """Raises a one-line :class:`InvalidInputError` unless ``trigger`` is an
    :class:`InvertedTrigger` for ``spec``'s images (mask ``(H, W, 1)``, pattern ``(H, W, C)``)
    with an integer target (below ``num_classes`` where given)."""
    if not isinstance(trigger, InvertedTrigger):
        raise InvalidInputError(
            f"a trigger must be an InvertedTrigger (from invert_trigger or scan_classes), got "
            f"{type(trigger).__name__}"
        )
    h, w, c = spec.image_shape
    for name, want in (("mask", (h, w, 1)), ("pattern", (h, w, c))):
        got = tuple(np.shape(getattr(trigger, name)))
        if got != want:
            raise InvalidInputError(
                f"the trigger's {name} has shape {got}; {spec.name} images need {want}"
            )
    if isinstance(trigger.target, bool) or not isinstance(trigger.target, (int, np.integer)):
        raise InvalidInputError(
            f"the trigger's target must be a class index, got {trigger.target!r}"
        )
    if num_classes is not None and not 0 <= trigger.target < num_classes:
        raise InvalidInputError(
            f"the trigger's target {trigger.target} is not a class of {spec.name}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class TriggerScan:
    """One trigger per class and Neural Cleanse's outlier test over their mask norms.

    Attributes:
        triggers: one :class:`InvertedTrigger` per class, in class order.
        anomaly_index: ``|l1_k - median| / (1.4826 * MAD)`` per class.
        flagged: classes whose norm lies below the median with an anomaly index above the
            threshold, smallest norm first (empty: no backdoor detected).
    """

    triggers: tuple[InvertedTrigger, ...]
    anomaly_index: np.ndarray
    flagged: tuple[int, ...]

    @property
    def mask_l1(self) -> np.ndarray:
        return np.array([t.mask_l1 for t in self.triggers])

    @property
    def suspect(self) -> InvertedTrigger:
        """The defender's best guess of the backdoor: the flagged class with the smallest mask,
        else (nothing flagged) the class with the smallest mask."""
        return self.triggers[self.flagged[0] if self.flagged else int(np.argmin(self.mask_l1))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask_l1": [round(float(v), 3) for v in self.mask_l1],
            "success": [round(t.success, 4) for t in self.triggers],
            "anomaly_index": [round(float(v), 3) for v in self.anomaly_index],
            "flagged": list(self.flagged),
        }


def stamp(
    images: Float[Array, "b h w c"], mask: Float[Array, "h w 1"], pattern: Float[Array, "h w c"]
) -> Float[Array, "b h w c"]:
    """Neural Cleanse's trigger application (NC Eq. 1), in [0, 1] image space."""
    return (1.0 - mask) * images + mask * pattern


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    """The MAD-based anomaly index of each value (NC section IV.C).

    Where more than half the values are equal (several classes' masks saturated to the same
    norm, say) the MAD is 0: a value equal to the median then has index 0 and any other an
    infinite one, the limit of a vanishing spread, so a lone small mask is still flagged.
    """
    norms = np.asarray(norms, dtype=np.float64)
    median = np.median(norms)
    deviation = np.abs(norms - median)
    mad = MAD_CONSISTENCY * np.median(deviation)
    if mad == 0:
        return np.where(deviation == 0, 0.0, np.inf)
    return deviation / mad


def flagged_classes(norms: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Classes with a norm below the median and an anomaly index above ``threshold``, smallest
    norm first."""
    norms = np.asarray(norms, dtype=np.float64)
    index = anomaly_index(norms)
    low = [k for k in range(len(norms)) if norms[k] < np.median(norms) and index[k] > threshold]
    return tuple(sorted(low, key=lambda k: norms[k]))


def inversion_loss(
    raw: dict[str, jax.Array],
    cost: jax.Array,
    model: nn.Module,
    variables: Variables,
    spec: DatasetSpec,
    images: Float[Array, "b h w c"],
    weight: Float[Array, " b"],
    target: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Neural Cleanse's objective for one batch (NC Eq. 2): the cross-entropy towards
    ``target`` of the stamped images, averaged over the rows of ``weight`` 1 (those not of
    the target class), plus ``cost * |m|_1``. ``raw`` holds the mask's and the pattern's
    logits; ``images`` are in [0, 1]. Returns ``(loss, (success on those rows, |m|_1))``."""
    mask, pattern = jax.nn.sigmoid(raw["mask"]), jax.nn.sigmoid(raw["pattern"])
    logits = model.apply(variables, normalize(stamp(images, mask, pattern), spec), train=False)
    count = jnp.maximum(weight.sum(), 1.0)
    targets = jnp.full(images.shape[:1], target)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
    l1 = mask.sum()
    return (weight * ce).sum() / count + cost * l1, ((weight * hits).sum() / count, l1)


def keep_best(
    best: dict[str, Any],
    raw: dict[str, jax.Array],
    success: jax.Array,
    l1: jax.Array,
    threshold: float,
) -> dict[str, Any]:
    """The best trigger so far (NC section IV.B): ``raw`` replaces ``best`` when its batch
    success reached ``threshold`` and its mask is smaller; ``best`` holds ``raw``, ``l1`` and
    ``found`` (start: ``l1`` infinite, ``found`` False)."""
    better = (success >= threshold) & (l1 < best["l1"])
    return jax.tree_util.tree_map(
        lambda new, old: jnp.where(better, new, old),
        {"raw": raw, "l1": l1, "found": jnp.bool_(True)},
        best,
    )


def chosen_trigger(best: dict[str, Any], last: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The logits returned: the best trigger, or the last iterate where no step reached the
    success threshold."""
    return jax.tree_util.tree_map(
        lambda kept, now: jnp.where(best["found"], kept, now), best["raw"], last
    )


def adapt_cost(
    cost: jax.Array,
    window: jax.Array,
    index: jax.Array,
    success: jax.Array,
    config: InversionConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Neural Cleanse's schedule of the L1 weight lambda (NC section IV.B): after every
    ``adapt_every`` steps, lambda is multiplied by ``cost_multiplier`` if the window's mean
    batch success reached ``success_threshold`` and divided by its 1.5th power otherwise, and
    the window restarts. Returns ``(cost, window, index)`` after a step of ``success``."""
    window = window + success
    index = index + 1
    end = index % config.adapt_every == 0
    factor = jnp.where(
        window / config.adapt_every >= config.success_threshold,
        config.cost_multiplier,
        1.0 / config.cost_multiplier**1.5,
    )
    return jnp.where(end, cost * factor, cost), jnp.where(end, 0.0, window), index


@functools.partial(jax.jit, static_argnames=("model", "spec", "config", "batch_size"))
def _optimise_trigger(
    model: nn.Module,
    spec: DatasetSpec,
    config: InversionConfig,
    batch_size: int,
    variables: Variables,
    images: Array,
    labels: Array,
    target: Array,
    key: PRNGKeyArray,
):
    """The whole optimisation of one class as one ``lax.scan``; returns the best (or last)
    mask and pattern, whether the threshold was reached, and the final cost."""
    h, w, c = spec.image_shape
    init_key, steps_key = jax.random.split(key)
    mask_key, pattern_key = jax.random.split(init_key)
    # float32 whatever the default dtype: the scan's carry holds float32 scalars (jax_enable_x64
    # would otherwise make the logits float64 and the carry's types differ)
    logits0 = {
        "mask": jax.random.normal(mask_key, (h, w, 1), jnp.float32),
        "pattern": jax.random.normal(pattern_key, (h, w, c), jnp.float32),
    }
    optimizer = optax.adam(config.learning_rate, b1=0.5, b2=0.9)
    others = (labels != target).astype(jnp.float32)

    def step(carry, step_key):
        raw, opt_state, cost, window, index, best = carry
        rows = jax.random.choice(step_key, labels.shape[0], (batch_size,), replace=False)
        (loss, (success, l1)), grads = jax.value_and_grad(inversion_loss, has_aux=True)(
            raw, cost, model, variables, spec, to_unit_range(images[rows]), others[rows], target
        )
        # the trigger scored is the one the gradient was taken at
        best = keep_best(best, raw, success, l1, config.success_threshold)
        updates, opt_state = optimizer.update(grads, opt_state, raw)
        raw = optax.apply_updates(raw, updates)
        cost, window, index = adapt_cost(cost, window, index, success, config)
        return (raw, opt_state, cost, window, index, best), loss

    best0 = {"raw": logits0, "l1": jnp.float32(jnp.inf), "found": jnp.bool_(False)}
    carry0 = (
        logits0,
        optimizer.init(logits0),
        jnp.float32(config.init_cost),
        jnp.float32(0.0),
        jnp.int32(0),
        best0,
    )
    keys = jax.random.split(steps_key, config.steps)
    (raw, _, cost, _, _, best), losses = jax.lax.scan(step, carry0, keys)
    chosen = chosen_trigger(best, raw)
    return (
        jax.nn.sigmoid(chosen["mask"]),
        jax.nn.sigmoid(chosen["pattern"]),
        best["found"],
        cost,
        losses,
    )


def inversion_arguments(
    where: str, config: InversionConfig | None, key: Any
) -> tuple[InversionConfig, PRNGKeyArray]:
    """The config (default :class:`InversionConfig`) and key (a typed key, a legacy key or an
    integer seed; default seed 0), with one-line errors for anything else."""
    config = InversionConfig() if config is None else config
    if type(config) is not InversionConfig:
        raise InvalidInputError(f"{where} takes an InversionConfig, got {type(config).__name__}")
    return config, as_key(where, key)


def invert_trigger(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    target: int,
    config: InversionConfig | None = None,
    key: PRNGKeyArray | None = None,
) -> InvertedTrigger:
    """The smallest trigger Neural Cleanse finds that sends ``clean_set`` to ``target``.

    Args:
        model: the classifier (applied in eval mode; its variables are not changed).
        variables: its collections (``params`` and ``batch_stats`` are used).
        clean_set: the defender's clean images; the loss counts those not of ``target``.
        target: the candidate target class, in ``[0, num_classes)``.
        config: the optimisation's settings (default :class:`InversionConfig`).
        key: a typed or legacy key, or an integer seed (``None``: seed 0).

    Returns:
        An :class:`InvertedTrigger`: the smallest mask whose batch reached
        ``success_threshold`` (the last iterate if none did), and its success on ``clean_set``.

    Raises:
        InvalidInputError: a target outside the classes, a clean set the model cannot take or
            with no image outside ``target``, a config that is not an :class:`InversionConfig`,
            or a ``key`` that is not a key or a seed in ``[0, 2**32)``.
        NonFiniteLossError: the optimisation diverged.
    """
    config, key = inversion_arguments("invert_trigger", config, key)
    validate_clean_set(clean_set, model, variables, train=False)  # eval mode only
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise InvalidInputError(f"target must be a class index, got {target!r}")
    if not 0 <= target < clean_set.num_classes:
        raise InvalidInputError(
            f"target {target} is not a class of {clean_set.spec.name} "
            f"(0..{clean_set.num_classes - 1})"
        )
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    on_device = jax.device_put((variables, clean_set.images, clean_set.labels))
    return _invert_checked(model, clean_set, on_device, target, config, key)


def _invert_checked(
    model: nn.Module,
    clean_set: ImageDataset,
    on_device: tuple[Variables, Array, Array],
    target: int,
    config: InversionConfig,
    key: PRNGKeyArray,
) -> InvertedTrigger:
    """:func:`invert_trigger` after its checks, on ``(variables, images, labels)`` already
    on the device (a scan uploads them once for all its classes)."""
    variables, images, labels = on_device
    mask, pattern, found, _, losses = _optimise_trigger(
        model,
        clean_set.spec,
        config,
        clean_batch_size(config.batch_size, clean_set),
        variables,
        images,
        labels,
        jnp.int32(target),
        key,
    )
    if not bool(jnp.isfinite(losses).all()):
        raise NonFiniteLossError(
            f"trigger inversion towards class {target} diverged (NaN loss); lower "
            "learning_rate or init_cost"
        )
    mask, pattern = np.asarray(mask), np.asarray(pattern)
    trigger = InvertedTrigger(
        target=int(target),
        mask=mask,
        pattern=pattern,
        mask_l1=float(mask.sum()),
        success=float("nan"),
        reached_threshold=bool(found),
    )
    success = synthesized_asr(
        model, variables, clean_set.images, clean_set.labels, trigger, clean_set.spec
    )
    return dataclasses.replace(trigger, success=success)


def scan_classes(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: InversionConfig | None = None,
    key: PRNGKeyArray | None = None,
    progress: bool = False,
) -> TriggerScan:
    """Neural Cleanse's detection: a trigger per class, then the outlier test over their norms.

    Each class gets its own key (folded from ``key``), so one class's trigger does not depend
    on which classes were scanned before it.

    Args:
        model: the classifier (applied in eval mode).
        variables: its collections.
        clean_set: the defender's clean images.
        config: the settings of every class's inversion (default :class:`InversionConfig`);
            its ``anomaly_threshold`` sets which classes are flagged.
        key: a typed or legacy key, or an integer seed (``None``: seed 0).
        progress: show a progress bar over the classes.

    Returns:
        A :class:`TriggerScan`: one trigger per class, their anomaly indices and the flagged
        classes.

    Raises:
        InvalidInputError: as :func:`invert_trigger`.
        NonFiniteLossError: a class's optimisation diverged.
    """
    config, key = inversion_arguments("scan_classes", config, key)
    validate_clean_set(clean_set, model, variables, train=False)  # eval mode only
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    # on the device once for every class (not once per class)
    on_device = jax.device_put((variables, clean_set.images, clean_set.labels))
    classes = range(clean_set.num_classes)
    if progress:
        from tqdm.auto import tqdm

        classes = tqdm(classes, desc="trigger inversion", unit="class")
    triggers = tuple(
        _invert_checked(model, clean_set, on_device, k, config, jax.random.fold_in(key, k))
        for k in classes
    )
    norms = np.array([t.mask_l1 for t in triggers])
    return TriggerScan(
        triggers=triggers,
        anomaly_index=anomaly_index(norms),
        flagged=flagged_classes(norms, config.anomaly_threshold),
    )


def synthesized_asr(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray | Array,
    labels: np.ndarray,
    trigger: InvertedTrigger,
    spec: DatasetSpec,
) -> float:
    """Fraction of the images *not* of the trigger's target class that its stamp sends there
    (SPEC section 1's ASR, with a synthesized trigger on defender-held images; NaN when every
    image is of the target class).

    Args:
        model: the classifier (applied in eval mode).
        variables: its collections.
        images: ``(n, h, w, c)`` uint8 pixels or floats in [0, 1].
        labels: their ``(n,)`` true labels.
        trigger: the trigger to stamp.
        spec: the dataset (image shape and normalisation).

    Returns:
        The fraction, a Python float (NaN when every image is of the target class).

    Raises:
        InvalidInputError: a trigger that does not fit ``spec``'s images, or labels that are
            not one per image.
    """
    check_trigger(trigger, spec)
    labels = np.asarray(labels)
    if labels.shape != (int(np.shape(images)[0]),):
        raise InvalidInputError(f"{labels.shape} labels for {np.shape(images)[0]} images")
    keep = np.flatnonzero(labels != trigger.target)
    if keep.size == 0:
        return float("nan")
    stamped = trigger.stamp(np.asarray(images)[keep])
    return float(np.mean(predict(model, variables, stamped, spec) == trigger.target))
