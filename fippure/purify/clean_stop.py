"""A defense's step count chosen on the clean set, with a synthesized trigger.

SPEC section 1: a defense's thresholds and early stops are chosen on D_v, never on test data,
with a trigger synthesized from D_v where the choice needs one. How long to fine-tune is such a
choice: stopped too late, FIP and its baselines lose accuracy; too early, the backdoor stays.
:func:`purify_with_clean_stop` makes the choice as a defender can (**choice**, every part
configurable in :class:`CleanStopConfig`):

1. D_v is split: the last ``validation_per_class`` images of each class are a validation slice,
   and the defense trains on the rest.
2. Unless the caller supplies a trigger, Neural Cleanse (:mod:`fippure.purify.trigger_inversion`)
   scans the training part, and the suspect is the flagged class with the smallest mask, else the
   class with the smallest mask.
3. The defense runs for ``max_steps``. Every ``every`` steps, and at the end, the iterate is
   scored on the validation slice. It is scored with the BatchNorm statistics that a run of that
   length would return. The scores are the suspect trigger's ASR on the non-target images and
   the clean accuracy. Under ``first_below`` the run ends at the first eligible check that
   reaches the threshold (no later check can change the choice; ``halt_when_reached``).
4. The stop is chosen by ``rule`` among the checks whose validation accuracy is within
   ``max_accuracy_drop`` of the undefended model's:
   - ``first_below``: the first check whose ASR is at most ``threshold``, else the lowest ASR;
   - ``lowest``: the lowest ASR, with the earliest check winning a tie.
   A trigger whose ASR on the undefended model is already at most ``threshold`` cannot tell a
   purified iterate from another: the search then runs to ``max_steps`` and the last eligible
   check is taken, with a warning, and the report says the threshold was not reached.
5. By default the scored iterate at the chosen step is returned: the model that was validated.
   With ``rerun`` the defense instead runs again for exactly that many steps, so that its
   learning-rate schedule spans the chosen length. Where the schedule depends on the step count
   (NFT's blocks, FT's cosine) that run is not the one scored. NFT ``brief_transfer`` on
   CIFAR-10 Blend, stopped at 30 steps, had test ASR 0.10 at the scored iterate (first 2,000
   test images) and 0.41 after the 30-step rerun (``experiments/results/clean_set_stop.md``).
   For a constant schedule (FIP's default) the two are the same run.

Measured on CIFAR-10 (``experiments/clean_set_stop.py``): for FIP on BadNets, Blend, Trojan and
Input-aware, the stop chosen this way met the test-split targets. On WaNet and SIG, Neural
Cleanse's trigger is not the attack's, and the rule falls back to the lowest proxy ASR.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from fippure.config_checks import AT_LEAST_ONE, FRACTION, Rule, check_config
from fippure.data.sources import ImageDataset
from fippure.data.splits import hold_out_per_class
from fippure.errors import InvalidInputError
from fippure.inference import accuracy
from fippure.models.registry import Variables
from fippure.purify.batch_stats import finalise_from_config
from fippure.purify.common import (
    LAST_ITERATE_EXTRAS,
    Observer,
    PurifyReport,
    StopEarly,
    clean_accuracy,
    defense_arguments,
    on_the_variables_device,
    validate_clean_set,
)
from fippure.purify.registry import Defense, get_defense
from fippure.purify.trigger_inversion import (
    InversionConfig,
    InvertedTrigger,
    check_trigger,
    scan_classes,
    synthesized_asr,
)

#: How the stop is chosen from the checks (see the module docstring).
StopRule = Literal["first_below", "lowest"]

#: Folded into the caller's key for the Neural Cleanse scan, so that the scan's randomness is
#: not the defense's (the defense itself gets the caller's key unchanged). A defense's step t
#: draws from ``fold_in(key, t)``, so the stream is the largest uint32, a step no run reaches
#: (it was 0x5CA7, which step 23,719 of a long search shared).
SCAN_STREAM = 0xFFFF_FFFF

CLEAN_STOP_RULES: dict[str, Rule] = {
    "max_steps": AT_LEAST_ONE,
    "every": AT_LEAST_ONE,
    "threshold": FRACTION,
    "max_accuracy_drop": FRACTION,
    "validation_per_class": AT_LEAST_ONE,
}


@dataclasses.dataclass(frozen=True)
class CleanStopConfig:
    """How :func:`purify_with_clean_stop` chooses the step count on D_v.

    Attributes:
        max_steps: the longest run considered; it replaces the defense config's ``steps``
            during the search.
        every: steps between checks. The final step is also checked.
        threshold: the synthesized-trigger ASR that counts as purified under ``first_below``.
        max_accuracy_drop: a check is eligible only if its validation accuracy is at most this
            far below the undefended model's on the same slice. (**choice**: 0.05. It keeps the
            rule from taking a collapsed model, whose trigger fires on nothing, as purified.)
        rule: ``first_below`` or ``lowest``; see the module docstring.
        validation_per_class: clean images per class held out for the checks. The defense
            trains on the others. (**choice**: 10, so 100 of CIFAR-10's 500.)
        rerun: run the defense again with the chosen step count (its schedule then spans that
            length) instead of returning the iterate scored at that step. (**choice**: False,
            so the returned model is the validated one; see step 5 above.)
        halt_when_reached: under ``first_below``, end the search at the first eligible check
            that reaches the threshold, as the choice is then made (**choice**: True; False
            runs to ``max_steps``, to chart every check).
        require_firing_trigger: judge the checks only with a trigger that fires on the
            undefended model (its validation ASR above ``threshold``); with one that does not,
            the search runs to ``max_steps`` and the last eligible check is taken (step 4
            above). (**choice**: True; False scores any trigger, as a test of the search's
            mechanics with ``threshold=1`` does.)
        inversion: the Neural Cleanse settings for the scan. (**choice**: 150 steps of
            32 images per class, which is about 40 s a class for a CIFAR-10 ResNet on 2 CPU
            cores.)
    """

    max_steps: int = 150
    every: int = 10
    threshold: float = 0.05
    max_accuracy_drop: float = 0.05
    rule: StopRule = "first_below"
    validation_per_class: int = 10
    rerun: bool = False
    halt_when_reached: bool = True
    require_firing_trigger: bool = True
    inversion: InversionConfig = InversionConfig(steps=150, batch_size=32)

    def __post_init__(self):
        check_config(self, CLEAN_STOP_RULES)
        if self.every > self.max_steps:
            raise InvalidInputError(
                f"every ({self.every}) must not exceed max_steps ({self.max_steps})"
            )
        if not isinstance(self.inversion, InversionConfig):
            raise InvalidInputError(
                f"inversion must be an InversionConfig, got {type(self.inversion).__name__}"
            )


def choose_stop(
    checks: list[dict[str, Any]], threshold: float, rule: str, min_accuracy: float = 0.0
) -> tuple[int, bool]:
    """The chosen check's step, and whether it reached ``threshold``.

    ``checks`` hold ``step``, ``validation_synth_asr`` and ``validation_acc``, in step order.
    Only checks whose accuracy is at least ``min_accuracy`` are eligible: a model that
    predicts one class has no synthesized ASR, and it has no use either. Among the eligible
    checks, ``first_below`` takes the first whose ASR is at most ``threshold``, else the
    lowest ASR. ``lowest`` takes the lowest ASR (the earliest on a tie). If no check is
    eligible, the most accurate one is taken. A NaN ASR never counts as reached or lowest.

    Args:
        checks: dicts with ``step``, ``validation_synth_asr`` and ``validation_acc``.
        threshold: the ASR at or below which a check counts as purified.
        rule: ``first_below`` or ``lowest``.
        min_accuracy: the validation accuracy a check needs to be eligible.

    Returns:
        ``(step, reached)``: the chosen check's step, and whether its ASR is at most
        ``threshold`` (False when no check is eligible).

    Raises:
        InvalidInputError: no checks, or an unknown rule.
    """
    if not checks:
        raise InvalidInputError("no checks to choose a stop from")
    if rule not in get_args(StopRule):
        raise InvalidInputError(
            f"unknown stop rule {rule!r}; use {' or '.join(get_args(StopRule))}"
        )
    asr = np.array([c["validation_synth_asr"] for c in checks], dtype=np.float64)
    acc = np.array([c["validation_acc"] for c in checks], dtype=np.float64)
    eligible = (acc >= min_accuracy) & ~np.isnan(asr)
    if not eligible.any():
        return int(checks[int(np.argmax(acc))]["step"]), False
    below = np.flatnonzero(eligible & (asr <= threshold))
    if rule == "first_below" and below.size:
        return int(checks[below[0]]["step"]), True
    best = int(np.argmin(np.where(eligible, asr, np.inf)))
    return int(checks[best]["step"]), bool(asr[best] <= threshold)


def last_eligible(checks: list[dict[str, Any]], min_accuracy: float = 0.0) -> int:
    """The step of the last check whose accuracy is at least ``min_accuracy`` (the most
    accurate check where none is): the stop taken when the trigger cannot judge the checks."""
    if not checks:
        raise InvalidInputError("no checks to choose a stop from")
    eligible = [c for c in checks if c["validation_acc"] >= min_accuracy]
    if not eligible:
        return int(max(checks, key=lambda c: c["validation_acc"])["step"])
    return int(eligible[-1]["step"])


@on_the_variables_device
def purify_with_clean_stop(
    defense: str | Defense,
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: Any,
    key: PRNGKeyArray | int | None = None,
    stop: CleanStopConfig | None = None,
    *,
    trigger: InvertedTrigger | None = None,
    progress: bool = True,
    observer: Observer | None = None,
) -> tuple[Variables, PurifyReport]:
    """Runs ``defense`` with its step count chosen on the clean set (module docstring).

    Args:
        defense: a registry name (``"fip"``) or :class:`Defense`.
        model, variables: the backdoored model.
        clean_set: the defender's D_v. It is split into a training part and a validation slice.
        config: the defense's config. Its ``steps`` is replaced by the search's
            ``stop.max_steps``, then by the chosen stop.
        key: the defense's key (or seed). The scan uses a stream folded from it.
        stop: the search's settings (default :class:`CleanStopConfig`).
        trigger: a synthesized trigger to score the checks with. If ``None``, one is found by
            scanning the training part.
        progress: progress bars.
        observer: ``observer(step, variables)`` at every check, with the variables as scored
            (for benchmarks that chart test metrics). Its return value is ignored.

    Returns:
        ``(variables, report)``: the report of the run returned. Its ``steps`` is the chosen
        stop, ``wall_time_s`` covers the whole procedure, and ``extra['clean_stop']`` records
        the split sizes, the suspect trigger, every check and the choice.

    Raises:
        InvalidInputError: a config without ``steps``, a class with too few clean images to
            hold some out, or a trigger for a class the model does not have.
    """
    started = time.perf_counter()
    defense = get_defense(defense) if isinstance(defense, str) else defense
    stop = CleanStopConfig() if stop is None else stop
    if type(stop) is not CleanStopConfig:
        raise InvalidInputError(
            f"the stop's settings must be a CleanStopConfig, got {type(stop).__name__}"
        )
    key = defense_arguments(defense.name, config, defense.config_class, key)
    if not hasattr(config, "steps"):
        raise InvalidInputError(f"{defense.name}'s config has no step count to choose")
    if getattr(config, "average_last", 0) > 1:
        raise InvalidInputError(
            "a clean-set stop scores the iterate at each check, not a tail average; set "
            "average_last=0"
        )
    validate_clean_set(clean_set, model, variables)
    fit_rows, validation_rows = hold_out_per_class(clean_set.labels, stop.validation_per_class)
    fit, validation = clean_set.subset(fit_rows), clean_set.subset(validation_rows)
    scan = None
    if trigger is None:
        scan = scan_classes(
            model,
            variables,
            fit,
            stop.inversion,
            jax.random.fold_in(key, SCAN_STREAM),
            progress=progress,
        )
        trigger = scan.suspect
    else:
        check_trigger(trigger, clean_set.spec, clean_set.num_classes)
    undefended_accuracy = accuracy(
        model, variables, validation.images, validation.labels, clean_set.spec
    )
    undefended_asr = synthesized_asr(
        model, variables, validation.images, validation.labels, trigger, clean_set.spec
    )
    # a trigger that does not fire on the undefended model says nothing about purification:
    # every check would "reach" the threshold, and the first one would be taken
    informative = not (stop.require_firing_trigger and undefended_asr <= stop.threshold)
    if not informative:
        warnings.warn(
            f"the suspect trigger (class {trigger.target}) sends only {undefended_asr:.3f} of "
            f"the validation images there before the defense, not above the threshold "
            f"{stop.threshold}: it cannot judge purification, so the search runs to max_steps "
            "and the last check within the accuracy guard is taken",
            stacklevel=2,
        )
    # a drop of exactly max_accuracy_drop is allowed (k/n accuracies round in the subtraction)
    min_accuracy = undefended_accuracy - stop.max_accuracy_drop - 1e-9
    searched = dataclasses.replace(config, steps=stop.max_steps)
    checks: list[dict[str, Any]] = []
    kept: Variables | None = None  # without rerun: the iterate of the current choice

    def choose(checks: list[dict[str, Any]]) -> tuple[int, bool]:
        if informative:
            return choose_stop(checks, stop.threshold, stop.rule, min_accuracy)
        return last_eligible(checks, min_accuracy), False

    def score(step: int, candidate: Variables) -> None:
        nonlocal kept
        checks.append(
            {
                "step": step,
                "validation_synth_asr": synthesized_asr(
                    model,
                    candidate,
                    validation.images,
                    validation.labels,
                    trigger,
                    clean_set.spec,
                ),
                "validation_acc": accuracy(
                    model, candidate, validation.images, validation.labels, clean_set.spec
                ),
            }
        )
        chosen, reached = choose(checks)
        if not stop.rerun and chosen == step:
            # a later check can only displace the current choice by becoming the choice itself,
            # so one copy of the variables is enough
            kept = candidate
        if observer is not None:
            observer(step, candidate)
        if stop.halt_when_reached and stop.rule == "first_below" and reached:
            raise StopEarly  # the first check under the threshold: the choice is made

    def check(step: int, iterate: Variables) -> None:
        # scored with the BatchNorm statistics a run of `step` steps would return: their
        # batches come from fold_in(key, step), as that run's would. The search's own step
        # `step` draws from the same key, but the iterate scored is the one before it.
        at_step = dataclasses.replace(searched, steps=step)
        final = (
            finalise_from_config(at_step, model, variables, iterate, fit, key)
            if hasattr(at_step, "final_batch_stats")
            else {}
        )
        score(step, {**iterate, **final})

    searched_variables, searched_report = defense.purify(
        model,
        variables,
        fit,
        searched,
        key,
        progress=progress,
        observer=check,
        observe_every=stop.every,
    )
    ran = searched_report.steps  # fewer than max_steps where the search halted
    if ran == stop.max_steps:
        try:
            score(stop.max_steps, searched_variables)
        except StopEarly:
            pass  # the last check reached the threshold: nothing is left to stop
    chosen, reached = choose(checks)
    if chosen == stop.max_steps:
        out, report = searched_variables, searched_report
    elif stop.rerun:
        out, report = defense.purify(
            model, variables, fit, dataclasses.replace(config, steps=chosen), key, progress=progress
        )
    elif chosen == ran:
        # the search halted at the chosen check: the defense's own result and report (its
        # masks or shifts included) are those of that iterate
        out, report = searched_variables, searched_report
    else:
        out = kept
        report = dataclasses.replace(
            searched_report,
            steps=chosen,
            clean_accuracy=clean_accuracy(model, out, fit),
            loss_curve=[p for p in searched_report.loss_curve if p["step"] <= chosen],
            # the masks or shifts a defense reports, and the statistics of them, are those
            # of its last step, not of the iterate returned
            artifacts={},
            extra={k: v for k, v in searched_report.extra.items() if k not in LAST_ITERATE_EXTRAS},
        )
    summary = {
        "config": dataclasses.asdict(stop),
        "fit_examples": len(fit),
        "validation_examples": len(validation),
        "undefended_validation_acc": undefended_accuracy,
        "undefended_validation_synth_asr": undefended_asr,
        "trigger_informative": informative,
        "suspect_target": trigger.target,
        "suspect_mask_l1": trigger.mask_l1,
        "scan": scan.to_dict() if scan is not None else None,
        "checks": checks,
        "chosen_step": chosen,
        "reached_threshold": reached,
        "searched_steps": stop.max_steps,
        "steps_run": ran,
    }
    report = dataclasses.replace(
        report,
        wall_time_s=time.perf_counter() - started,
        extra={**report.extra, "clean_stop": summary},
    )
    return out, report


def make_clean_stop_config(overrides: dict[str, Any] | None = None) -> CleanStopConfig:
    """A :class:`CleanStopConfig` from ``key=value`` overrides (strings are parsed).

    Keys prefixed with ``inversion.`` (``inversion.steps=300``) set the Neural Cleanse scan's
    :class:`~fippure.purify.trigger_inversion.InversionConfig`.

    Args:
        overrides: ``{field: value}`` with Python values or strings to parse (``"300"``,
            ``"true"``); ``inversion.<field>`` keys set the scan's config. ``None``: the
            defaults.

    Returns:
        The config; its ``inversion`` is the default one (150 steps of 32 images) with the
        ``inversion.`` overrides.

    Raises:
        UnknownNameError: for an unknown key.
        InvalidInputError: for a value of the wrong type or out of range, or a bare
            ``inversion`` key (its fields are set one by one).
    """
    from fippure.purify.registry import config_with_overrides

    overrides = dict(overrides or {})
    prefix = "inversion."
    nested = {k[len(prefix) :]: v for k, v in overrides.items() if k.startswith(prefix)}
    own = {k: v for k, v in overrides.items() if not k.startswith(prefix)}
    if "inversion" in own:
        raise InvalidInputError("set the scan's options one by one, e.g. inversion.steps=300")
    inversion = dataclasses.asdict(CleanStopConfig().inversion) | nested
    config = config_with_overrides(CleanStopConfig, own, "clean stop")
    return dataclasses.replace(
        config, inversion=config_with_overrides(InversionConfig, inversion, "clean stop inversion")
    )
