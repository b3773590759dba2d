"""Supervised training of a classifier (clean or poisoned), resumable from orbax checkpoints.

The whole training set lives on the device; each jitted step gathers its batch from a
device-resident permutation, applies an optional in-graph ``batch_transform`` (how attacks
poison batches on the fly), augments, normalises and takes an SGD step. The permutation of an
epoch and the key of a step are pure functions of ``(seed, epoch)`` and ``(seed, step)``, so a
run killed at any checkpoint resumes to the same final parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm.auto import tqdm

from fippure.checkpoints import claim_run_directory
from fippure.config_checks import (
    AT_LEAST_ONE,
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    check_config,
)
from fippure.data.augment import augment
from fippure.data.catalog import DatasetSpec
from fippure.data.pipeline import (
    batch_from_permutation,
    epoch_permutation,
    normalize,
    to_unit_range,
)
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError, NonFiniteLossError
from fippure.losses import cross_entropy
from fippure.models.contract import dropout_rngs
from fippure.models.registry import Variables, in_dtypes_of, output_shape
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
    private_copy,
    step_guard,
    sum_metrics,
)

#: ``(key, images in [0, 1], labels, example indices) -> (images, labels)``, traced in the step.
BatchTransform = Callable[
    [PRNGKeyArray, Float[Array, "b h w c"], Int[Array, " b"], Int[Array, " b"]],
    tuple[Float[Array, "b h w c"], Int[Array, " b"]],
]
#: ``variables -> {metric name: value}``, called every ``eval_every`` epochs and at the end,
#: with a copy of the variables (the train step donates its own), so it may keep them.
Evaluator = Callable[[Variables], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of supervised training (SPEC section 1, CPU-scale recipe).

    Attributes:
        epochs: passes over the training set.
        batch_size: examples per step (the last partial batch of an epoch is dropped).
        learning_rate: peak learning rate.
        schedule: ``onecycle`` (linear warm-up then cosine decay), ``cosine`` or ``constant``.
        warmup_fraction: fraction of steps spent warming up (``onecycle`` only).
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient added to the gradient of every parameter.
        label_smoothing: label smoothing of the cross-entropy.
        augment: random crop and (where the dataset allows) horizontal flip.
        eval_every: evaluate every this many epochs (and after the last one).
        checkpoint_every: save every this many steps; 0 saves at the end of every epoch.
        log_every: refresh the progress bar's loss (a host sync) every this many steps.
        seed: seed of initialisation, data order and augmentation.
    """

    epochs: int = 15
    batch_size: int = 128
    learning_rate: float = 0.1
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = 0.15
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: bool = True
    eval_every: int = 5
    checkpoint_every: int = 0
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        check_config(
            self,
            {
                "epochs": AT_LEAST_ONE,
                "batch_size": AT_LEAST_ONE,
                "learning_rate": POSITIVE,
                "warmup_fraction": BELOW_ONE,
                "momentum": BELOW_ONE,
                "weight_decay": NON_NEGATIVE,
                "label_smoothing": BELOW_ONE,
                "eval_every": AT_LEAST_ONE,
                "checkpoint_every": NON_NEGATIVE,
                "log_every": AT_LEAST_ONE,
                "seed": SEED,
            },
        )
        if self.nesterov and not self.momentum:  # optax would drop Nesterov silently
            raise InvalidInputError("TrainConfig.nesterov needs a momentum > 0, got momentum 0")


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: Int[Array, ""]
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict[str, Any]:
        """The model variables (``params`` and, if any, ``batch_stats``)."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


@dataclasses.dataclass
class TrainReport:
    """What happened during :func:`train`.

    Attributes:
        history: one dict per epoch: ``epoch``, ``loss``, ``train_accuracy``, and the
            evaluator's metrics on the epochs it ran (every ``eval_every`` and the last).
        steps: total optimisation steps of the run.
        epochs: epochs of the run.
        resumed_from_step: the step the run resumed from (0 for a fresh start).
        wall_time_s: seconds spent in this call (compilation and evaluation included).
        total_wall_time_s: seconds spent over every call of this run (resumes included).
        train_images_per_s: training throughput of this call, compilation and evaluation
            excluded; ``None`` when nothing could be timed (a one-epoch run, whose first
            interval is compilation, or a resumed run with no steps left).
        final: the last evaluation's metrics.
    """

    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    resumed_from_step: int = 0
    wall_time_s: float = 0.0
    total_wall_time_s: float = 0.0
    train_images_per_s: float | None = None
    final: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, total_steps)
    return optax.cosine_onecycle_schedule(
        total_steps, config.learning_rate, pct_start=config.warmup_fraction
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (as PyTorch's ``SGD(weight_decay=...)``)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(
            learning_rate_schedule(config, total_steps),
            momentum=config.momentum or None,
            nesterov=config.nesterov,
        ),
    )


def create_train_state(variables: Variables, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` at step 0.

    The arrays are copied: the train step donates its state, and donating the caller's
    ``variables`` would delete them.
    """
    params = jax.tree_util.tree_map(jnp.array, variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree_util.tree_map(jnp.array, variables.get("batch_stats", {})),
        opt_state=optimizer.init(params),
    )


def hoist_constants(function: Callable, *example: Any) -> Partial:
    """``function`` as a :class:`jax.tree_util.Partial` whose leaves are the arrays it closes
    over, on the device once: passed to a jitted step as an argument, they are not baked into
    the compiled program as constants. An attack's poisoning transform closes over its plan
    (one entry per training example) and its trigger state; as constants they made the program
    grow with the dataset, and every plan or seed a program of its own. ``example``: arguments
    (arrays or :class:`jax.ShapeDtypeStruct`) of the shapes ``function`` is called with."""
    closed, shapes = jax.make_jaxpr(function, return_shape=True)(*example)
    # the traced program is the Partial's static part (one object: one compiled step)
    program = functools.partial(_evaluate_jaxpr, closed.jaxpr, jax.tree_util.tree_structure(shapes))
    return Partial(program, jax.device_put(list(closed.consts)))


def _evaluate_jaxpr(jaxpr, out_tree, constants, *args):
    outputs = jax.core.eval_jaxpr(jaxpr, constants, *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(out_tree, outputs)


def make_train_step(
    model: nn.Module,
    spec: DatasetSpec,
    config: TrainConfig,
    optimizer: optax.GradientTransformation,
    batch_transform: BatchTransform | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """The jitted step ``(state, images, labels, permutation, index, key) -> (state, metrics)``.

    ``images``/``labels`` are the whole device-resident training set, ``permutation`` the
    epoch's order and ``index`` the batch number within the epoch. The arrays
    ``batch_transform`` closes over are hoisted into an argument of the compiled step at the
    first call (:func:`hoist_constants`), not compiled in.
    """

    def step(state: TrainState, images, labels, permutation, index, key, transform=None):
        key = jax.random.fold_in(key, state.step)
        transform_key, augment_key = jax.random.split(key)
        x, y, rows = batch_from_permutation(images, labels, permutation, index, config.batch_size)
        x = to_unit_range(x)
        if transform is not None:
            x, y = transform(transform_key, x, y, rows)
        if config.augment:
            x = augment(augment_key, x, spec.crop_padding, spec.flip)
        x = normalize(x, spec)

        rngs = dropout_rngs(key)  # the model's Dropout, if any

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
                logits, updates = model.apply(
                    variables, x, train=True, mutable=["batch_stats"], rngs=rngs
                )
                new_stats = in_dtypes_of(updates["batch_stats"], state.batch_stats)
            else:
                logits = model.apply(variables, x, train=True, rngs=rngs)
                new_stats = state.batch_stats
            return cross_entropy(logits, y, config.label_smoothing), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=new_stats,
            opt_state=opt_state,
        )
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}
        return state, metrics

    compiled = jax.jit(step, donate_argnums=(0,))
    if batch_transform is None:
        return compiled
    hoisted: list[Partial] = []

    def step_with_transform(state, images, labels, permutation, index, key):
        if not hoisted:  # traced once, on the first batch's shapes

            def first_batch():
                x, y, rows = batch_from_permutation(
                    images, labels, permutation, index, config.batch_size
                )
                return to_unit_range(x), y, rows

            hoisted.append(hoist_constants(batch_transform, key, *jax.eval_shape(first_batch)))
        return compiled(state, images, labels, permutation, index, key, hoisted[0])

    return step_with_transform


def _run_fingerprint(model: nn.Module, data: ImageDataset, config: TrainConfig) -> dict:
    return {
        "model": repr(model),
        "dataset": data.spec.name,
        "num_examples": len(data),
        "config": dataclasses.asdict(config),
    }


def check_classifier(model: nn.Module, variables: Variables, data: ImageDataset) -> None:
    """One-line errors for variables that are not ``model``'s, or a model whose outputs are
    not one logit per class of ``data`` (labels past the last logit would make the loss NaN,
    reported as a too-high rate, or be ignored)."""
    outputs = output_shape(model, variables, data.spec.image_shape)
    if outputs != (data.num_classes,):
        raise InvalidInputError(
            f"the model's outputs have shape {outputs} but {data.spec.name} has "
            f"{data.num_classes} classes; build it with num_classes={data.num_classes}"
        )


def train(
    model: nn.Module,
    data: ImageDataset,
    config: TrainConfig,
    *,
    variables: Variables,
    workdir: str | os.PathLike | None = None,
    evaluate: Evaluator | None = None,
    batch_transform: BatchTransform | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> tuple[dict[str, Any], TrainReport]:
    """Trains ``model`` on ``data`` and returns the final variables and a report.

    Args:
        model: a Flax module applied as ``model.apply(variables, x, train=...)``.
        data: the training set (uint8 images, or float images in [0, 1]).
        config: the :class:`TrainConfig`.
        variables: initial ``{'params', 'batch_stats'}`` (e.g. from ``init_variables``).
        workdir: where orbax checkpoints go. If it already holds a checkpoint of the same run,
            training resumes from the latest one; a checkpoint of another run is an error.
        evaluate: called with the variables every ``config.eval_every`` epochs and at the end.
        batch_transform: in-graph poisoning of each batch, before augmentation.
        progress: show a progress bar.
        stop_after_steps: stop (after checkpointing) once this many steps are done (>= 1);
            for tests and for splitting a long run into pieces.

    Returns:
        ``(variables, report)``.

    Raises:
        InvalidInputError: if ``variables`` do not fit ``model`` on ``data``'s images, the
            model's outputs are not ``data``'s classes, or the batch exceeds the data.
        NonFiniteLossError: if the loss becomes NaN or infinite.
        CheckpointError: if ``workdir`` holds a run with another configuration.
    """
    started = time.perf_counter()
    n = len(data)
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch == 0:
        raise InvalidInputError(f"batch_size {config.batch_size} exceeds the {n} training images")
    if stop_after_steps is not None and (
        isinstance(stop_after_steps, bool)
        or not isinstance(stop_after_steps, int | np.integer)
        or stop_after_steps < 1
    ):
        raise InvalidInputError(
            f"stop_after_steps must be a positive integer or None, got {stop_after_steps!r}"
        )
    check_classifier(model, variables, data)
    total_steps = steps_per_epoch * config.epochs
    optimizer = make_optimizer(config, total_steps)
    state = create_train_state(variables, optimizer)
    manager = None
    report = TrainReport(steps=total_steps, epochs=config.epochs)
    record, saves = {}, []
    if workdir is not None:
        saved = _prepare_workdir(workdir, model, data, config)
        manager = checkpoint_manager(workdir)
        state, report.resumed_from_step = restore_latest(manager, state)
        report.history, record, saves = resume_from(
            saved, report.resumed_from_step, steps_per_epoch
        )
        report.total_wall_time_s = record.get("elapsed_s", 0.0)
        evaluated = [h for h in report.history if set(h) - {"epoch", "loss", "train_accuracy"}]
        if evaluated:  # the last evaluation so far, as an uninterrupted run reports it
            report.final = {k: v for k, v in evaluated[-1].items() if k != "epoch"}
    previous_elapsed = report.total_wall_time_s
    train_step = make_train_step(model, data.spec, config, optimizer, batch_transform)
    images, labels = jax.device_put(data.images), jax.device_put(data.labels.astype(np.int32))
    base_key = jax.random.key(config.seed)
    order_key, step_key = jax.random.split(jax.random.fold_in(base_key, 1))
    start = int(state.step)
    stop = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
    checkpoint_every = config.checkpoint_every or steps_per_epoch
    permutation = epoch_permutation(order_key, start // steps_per_epoch, n)
    # kept on the device until the epoch ends; a run resumed mid-epoch starts from the saved ones
    epoch_metrics = restore_epoch_metrics(record.get("epoch_so_far"), start, steps_per_epoch)
    step_seconds, timed_steps, last_mark = 0.0, 0, start
    bar = tqdm(
        total=total_steps,
        initial=start,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        desc=f"train {data.spec.name}",
        mininterval=2.0,
    )
    tick = time.perf_counter()
    # the batch of the epoch, made on the device ahead (no upload per step)
    batch_indices = device_indices(start, stop, modulus=steps_per_epoch)
    for step, index in zip(range(start, stop), batch_indices, strict=True):
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 and step != start:
            permutation = epoch_permutation(order_key, epoch, n)
        with step_guard():
            state, metrics = train_step(state, images, labels, permutation, index, step_key)
        epoch_metrics.append(metrics)
        bar.update(1)
        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        if done % config.log_every == 0 or end_of_epoch or done == stop:
            loss = float(metrics["loss"])  # one host sync per log interval
            if not np.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(
                    f"training loss was {loss} at step {done} (it is read every "
                    f"{config.log_every} steps and at epoch ends); lower the learning rate"
                )
            bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1)
            now = time.perf_counter()
            if last_mark > start:  # the first interval includes compilation
                step_seconds += now - tick
                timed_steps += done - last_mark
            tick, last_mark = now, done
        if end_of_epoch:
            totals = sum_metrics(epoch_metrics)
            entry = {
                "epoch": done // steps_per_epoch,
                "loss": float(totals["loss"]) / len(epoch_metrics),
                "train_accuracy": float(totals["accuracy"]) / len(epoch_metrics),
            }
            epoch_metrics = []
            last = done == total_steps
            if evaluate is not None and (entry["epoch"] % config.eval_every == 0 or last):
                entry.update(
                    {k: float(v) for k, v in evaluate(private_copy(state.variables())).items()}
                )
                bar.write(" ".join(f"{k}={v:.4g}" for k, v in entry.items()), file=sys.stderr)
                report.final = {k: v for k, v in entry.items() if k != "epoch"}
            report.history.append(entry)
            tick, last_mark = time.perf_counter(), max(last_mark, done)
        saving = manager is not None and (done % checkpoint_every == 0 or done == stop)
        if (saving or done == stop) and not bool(all_finite(state)):
            # the loss of a step is taken before its update, so it cannot see the last one;
            # and no progress is saved with NaNs in it (a rerun would resume them)
            bar.close()
            raise NonFiniteLossError(
                f"training's parameters or optimiser state became non-finite by step {done}; "
                "lower the learning rate"
            )
        if saving:
            saves = save_progress(
                manager,
                workdir,
                done,
                state,
                report.history,
                saves,
                elapsed_s=previous_elapsed + time.perf_counter() - started,
                epoch_so_far=epoch_metrics_to_save(epoch_metrics, done),
            )
            tick, last_mark = time.perf_counter(), max(last_mark, done)
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    report.wall_time_s = time.perf_counter() - started
    report.total_wall_time_s = previous_elapsed + report.wall_time_s
    if timed_steps:
        report.train_images_per_s = timed_steps * config.batch_size / step_seconds
    return state.variables(), report


def _prepare_workdir(workdir, model, data, config) -> dict[str, Any]:
    """Claims ``workdir``; returns what the run it resumes saved beside its checkpoints
    (:func:`~fippure.progress_records.read_progress`), or an empty record."""
    directory = pathlib.Path(workdir).resolve()
    if claim_run_directory(directory, _run_fingerprint(model, data, config)):
        return read_progress(directory)
    return empty_progress()
