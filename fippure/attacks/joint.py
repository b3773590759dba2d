"""The training loop of attacks that learn their trigger together with the classifier.

Input-aware and LIRA train a generator and the classifier in the same run, in phases
(Input-aware: the mask generator alone, then generator and classifier jointly; LIRA: jointly,
then the classifier alone). :func:`run_phases` runs such a sequence the way
:func:`fippure.training.train` runs plain training: the whole training set on the device, one
jitted step per batch gathered from the epoch's permutation, a progress bar, evaluation every
``eval_every`` classifier epochs, and orbax checkpoints of the whole carry (classifier,
generators, optimiser states) in ``workdir`` so an interrupted run resumes where it stopped.
The epoch order and every step's key are pure functions of the seed and the global step, so a
resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from fippure.checkpoints import claim_run_directory
from fippure.data.pipeline import batch_from_permutation, epoch_permutation, to_unit_range
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError, NonFiniteLossError
from fippure.losses import cross_entropy
from fippure.models.contract import dropout_rngs
from fippure.models.registry import in_dtypes_of
from fippure.progress_records import (
    checkpoint_manager,
    empty_progress,
    epoch_metrics_to_save,
    read_progress,
    restore_epoch_metrics,
    restore_latest,
    resume_from,
    save_progress,
)
from fippure.step_inputs import (
    all_finite,
    device_indices,
    folded_keys,
    private_copy,
    step_guard,
    sum_metrics,
)
from fippure.training import TrainReport, TrainState, hoist_constants

#: ``(carry, images, labels, permutation, index, key) -> (carry, metrics)``; ``images`` and
#: ``labels`` are the whole device-resident training set, ``index`` the batch of the epoch.
PhaseStep = Callable[..., tuple[Any, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a joint run.

    Attributes:
        name: shown in the progress bar and the history.
        epochs: passes over the training set (0 skips the phase).
        step: the step; its metrics must include ``loss``. A plain function is compiled by
            :func:`run_phases`, with the arrays it closes over (a poisoning plan, one entry per
            training example) as an argument rather than baked-in constants, and its carry
            donated; a function already jitted is called as it is.
        trains_classifier: whether these epochs train the classifier (they are counted as
            classifier epochs and evaluated).
    """

    name: str
    epochs: int
    step: PhaseStep
    trains_classifier: bool = True


def run_phases(
    phases: Sequence[Phase],
    carry: Any,
    data: ImageDataset,
    *,
    batch_size: int,
    seed: int,
    fingerprint: Mapping[str, Any],
    workdir: str | os.PathLike | None = None,
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 5,
    log_every: int = 50,
    checkpoint_every: int = 0,
    progress: bool = True,
    desc: str = "train",
    stop_after_steps: int | None = None,
) -> tuple[Any, TrainReport]:
    """Runs ``phases`` one after the other on ``data`` and returns ``(carry, report)``.

    Args:
        phases: the stages, in order.
        carry: the initial pytree threaded through every step (and checkpointed).
        data: the training set (uint8 images).
        batch_size: examples per step (the last partial batch of an epoch is dropped).
        seed: seed of the epoch order and of the step keys.
        fingerprint: JSON-able description of the run; a ``workdir`` holding a run with
            another fingerprint is an error rather than silently resumed.
        workdir: where orbax checkpoints go (resumes from the latest one).
        evaluate: ``carry -> metrics``, after every ``eval_every`` classifier epochs and the
            last one.
        eval_every: evaluation interval in classifier epochs.
        log_every: host-sync interval (loss check, progress bar) in steps.
        checkpoint_every: save every this many steps; 0 saves at the end of every epoch.
        progress: show a progress bar.
        desc: progress bar label.
        stop_after_steps: stop (after checkpointing) once this many steps are done.

    Raises:
        NonFiniteLossError: if a loss becomes NaN or infinite.
        CheckpointError: if ``workdir`` holds a run with another fingerprint.
    """
    started = time.perf_counter()
    n = len(data)
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise InvalidInputError(f"batch_size {batch_size} exceeds the {n} training images")
    save_every = checkpoint_every or steps_per_epoch
    bounds = np.cumsum([0] + [p.epochs * steps_per_epoch for p in phases])
    total_steps = int(bounds[-1])
    classifier_epochs = sum(p.epochs for p in phases if p.trains_classifier)
    report = TrainReport(steps=total_steps, epochs=classifier_epochs)
    manager = None
    record: dict[str, Any] = {}
    saves: list[dict[str, Any]] = []
    if workdir is not None:
        workdir = pathlib.Path(workdir).resolve()
        claimed = claim_run_directory(workdir, dict(fingerprint))  # True: resuming this run
        saved = read_progress(workdir) if claimed else empty_progress()
        manager = checkpoint_manager(workdir)
        carry, report.resumed_from_step = restore_latest(manager, carry)
        report.history, record, saves = resume_from(
            saved, report.resumed_from_step, steps_per_epoch
        )
        report.total_wall_time_s = record.get("elapsed_s", 0.0)
        report.final = record.get("final") or {}
    previous_elapsed = report.total_wall_time_s
    images, labels = jax.device_put(data.images), jax.device_put(data.labels.astype(np.int32))
    order_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    start = report.resumed_from_step
    stop = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    bar = tqdm(
        total=total_steps,
        initial=start,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=desc,
        mininterval=2.0,
    )
    # kept on the device until the epoch ends; a run resumed mid-epoch starts from the saved ones
    epoch_metrics = restore_epoch_metrics(record.get("epoch_so_far"), start, steps_per_epoch)
    step_seconds, timed_steps, last_mark = 0.0, 0, start
    tick = time.perf_counter()
    permutation = None
    compiled: dict[int, Callable] = {}
    # the batch of the epoch and fold_in(step_key, step), made on the device ahead
    per_step = zip(
        range(start, stop),
        device_indices(start, stop, modulus=steps_per_epoch),
        folded_keys(step_key, start, stop),
        strict=True,
    )
    for step, index, key in per_step:
        phase_index = int(np.searchsorted(bounds, step, side="right")) - 1
        phase = phases[phase_index]
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 or permutation is None:
            permutation = epoch_permutation(order_key, epoch, n)
        with step_guard():
            if phase_index not in compiled:  # traced once, on the first call's arguments
                compiled[phase_index] = _compiled_step(
                    phase.step, carry, images, labels, permutation, index, key
                )
            carry, metrics = compiled[phase_index](carry, images, labels, permutation, index, key)
        epoch_metrics.append(metrics)
        bar.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        if done % log_every == 0 or end_of_epoch or done == stop:
            loss = float(metrics["loss"])  # one host sync per log interval
            if not np.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(
                    f"{phase.name} loss was {loss} at step {done} (it is read every "
                    f"{log_every} steps and at epoch ends); lower the learning rate"
                )
            bar.set_postfix(phase=phase.name, loss=f"{loss:.3f}", epoch=epoch + 1)
            now = time.perf_counter()
            if last_mark > start:  # the first interval includes compilation
                step_seconds += now - tick
                timed_steps += done - last_mark
            tick, last_mark = now, done
        if end_of_epoch:
            entry: dict[str, Any] = {"epoch": done // steps_per_epoch, "phase": phase.name}
            entry.update(epoch_means(sum_metrics(epoch_metrics), len(epoch_metrics)))
            epoch_metrics = []
            if phase.trains_classifier:
                previous = sum(p.epochs for p in phases[:phase_index] if p.trains_classifier)
                classifier_epoch = previous + (done - int(bounds[phase_index])) // steps_per_epoch
                entry["classifier_epoch"] = classifier_epoch
                last = classifier_epoch == classifier_epochs
                if evaluate is not None and (classifier_epoch % eval_every == 0 or last):
                    # a copy: the next step donates the carry, and the callback may keep it
                    entry.update({k: float(v) for k, v in evaluate(private_copy(carry)).items()})
                    report.final = {k: v for k, v in entry.items() if k not in ("epoch", "phase")}
            bar.write(" ".join(_fmt(k, v) for k, v in entry.items()), file=sys.stderr)
            report.history.append(entry)
            tick, last_mark = time.perf_counter(), max(last_mark, done)
        saving = manager is not None and (done % save_every == 0 or done == stop)
        if (saving or done == stop) and not bool(all_finite(carry)):
            # a step's loss is taken before its update; no progress is saved with NaNs in it
            bar.close()
            raise NonFiniteLossError(
                f"{phase.name}: the carry (classifier, generators, optimiser states) became "
                f"non-finite by step {done}; lower the learning rate"
            )
        if saving:
            saves = save_progress(
                manager,
                workdir,
                done,
                carry,
                report.history,
                saves,
                elapsed_s=previous_elapsed + time.perf_counter() - started,
                epoch_so_far=epoch_metrics_to_save(epoch_metrics, done),
                final=report.final,
            )
            tick, last_mark = time.perf_counter(), max(last_mark, done)
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    report.wall_time_s = time.perf_counter() - started
    report.total_wall_time_s = previous_elapsed + report.wall_time_s
    if timed_steps:
        report.train_images_per_s = timed_steps * batch_size / step_seconds
    return carry, report


def _compiled_step(step: PhaseStep, *example: Any) -> PhaseStep:
    """``step`` compiled with its carry donated and its closed-over arrays passed in as an
    argument (:func:`fippure.training.hoist_constants`); a jitted ``step`` as it is."""
    if hasattr(step, "lower"):
        return step
    return functools.partial(_run_hoisted, hoist_constants(step, *example))


@functools.partial(jax.jit, donate_argnums=1)
def _run_hoisted(program, carry, images, labels, permutation, index, key):
    return program(carry, images, labels, permutation, index, key)


def epoch_means(totals: Mapping[str, Array], steps: int) -> dict[str, float]:
    """An epoch's metrics from their per-step sums: the mean over its steps, except a rate a
    step reports as ``<name>_correct`` and ``<name>_count`` (counts of the rows it concerns),
    which becomes ``<name>`` = correct / count over the whole epoch (a mean of per-step ratios
    would count a step without such a row as 0; NaN if the epoch had none)."""
    totals = {k: float(v) for k, v in totals.items()}
    out = {}
    for key, value in totals.items():
        if key.endswith("_count") and key[: -len("_count")] + "_correct" in totals:
            continue
        if key.endswith("_correct") and (name := key[: -len("_correct")]) + "_count" in totals:
            count = totals[name + "_count"]
            out[name] = value / count if count else float("nan")
        else:
            out[key] = value / steps
    return out


def adam(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """Adam with the betas (0.5, 0.9) that generator training in these papers uses."""
    return optax.adam(learning_rate, b1=0.5, b2=0.9)


def unit_batch(
    images: Array, labels: Array, permutation: Array, index: Array, batch_size: int
) -> tuple[Float[Array, "b h w c"], Int[Array, " b"], Int[Array, " b"]]:
    """The ``index``-th batch of an epoch as [0, 1] floats: ``(images, labels, rows)``."""
    x, y, rows = batch_from_permutation(images, labels, permutation, index, batch_size)
    return to_unit_range(x), y, rows


def classifier_loss(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    inputs: Float[Array, "b h w c"],
    labels: Int[Array, " b"],
    label_smoothing: float = 0.0,
    weights: Float[Array, " b"] | None = None,
    key: Array | None = None,
) -> tuple[Array, tuple[Array, Any]]:
    """Train-mode cross-entropy of normalised ``inputs``: ``(loss, (logits, new_batch_stats))``.

    The loss is the batch mean, or ``sum(weights * per-example loss)`` when ``weights`` is
    given. The model's Dropout, if any, draws from the stream folded from ``key`` (the step's
    key, :func:`fippure.models.contract.dropout_rngs`).
    """
    rngs = dropout_rngs(key)
    if batch_stats:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        batch_stats = in_dtypes_of(updates["batch_stats"], batch_stats)
    else:
        logits = model.apply({"params": params}, inputs, train=True, rngs=rngs)
    if weights is None:
        return cross_entropy(logits, labels, label_smoothing), (logits, batch_stats)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    return jnp.sum(weights * per_example), (logits, batch_stats)


def apply_classifier_update(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    grads: Any,
    batch_stats: Any,
) -> TrainState:
    """One optimiser step of the classifier's :class:`~fippure.training.TrainState`."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )


def run_fingerprint(
    attack: Any, model: nn.Module, data: ImageDataset, config: Any, num_poisoned: int
) -> dict[str, Any]:
    """What must match for a workdir to be resumed."""
    return {
        "attack": attack.name,
        "attack_options": attack.options(),
        "model": repr(model),
        "dataset": data.spec.name,
        "num_examples": len(data),
        "num_poisoned": int(num_poisoned),
        "config": dataclasses.asdict(config),
    }


def _fmt(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
