"""What every defense shares: the clean-batch sampler, the step loop and the report.

Every defense is a pure function::

    purify(model, variables, clean_set, config, key) -> (new_variables, report)

It sees the model, its variables and the defender's clean set D_v, never test data. Its hot
step is one jitted function; a Python loop drives it with a progress bar and syncs with the
host only every ``log_every`` steps (to log the loss and stop on NaN). Given a
:class:`fippure.purify.resume.Checkpointing`, the loop saves its carry and resumes after a kill.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, get_args

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm.auto import tqdm

from fippure.config_checks import AT_LEAST_ONE, BELOW_ONE, NON_NEGATIVE, POSITIVE, Rule
from fippure.data.augment import augment as augment_images
from fippure.data.catalog import DatasetSpec
from fippure.data.pipeline import normalize, to_unit_range
from fippure.data.sources import ImageDataset
from fippure.data.splits import check_clean_set
from fippure.errors import CheckpointError, InvalidInputError, NonFiniteLossError
from fippure.models.contract import (
    check_hashable,
    check_logits,
    check_train_keyword,
    dropout_rngs,
)
from fippure.models.registry import Variables, in_dtypes_of
from fippure.purify.resume import Checkpointing, ProgressStore
from fippure.step_inputs import all_finite, folded_keys, private_copy, step_guard

#: Learning-rate schedules of the SGD-based defenses.
Schedule = Literal["cosine", "constant"]

#: Ranges of the hyper-parameters that several defenses share, for
#: :func:`fippure.config_checks.check_config` (a config's own fields add to it).
SHARED_RULES: dict[str, Rule] = {
    "steps": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "learning_rate": POSITIVE,
    "momentum": BELOW_ONE,
    "weight_decay": NON_NEGATIVE,
    "label_smoothing": BELOW_ONE,
    "eta_r": NON_NEGATIVE,
    "stats_batches": AT_LEAST_ONE,
    "log_every": AT_LEAST_ONE,
}


#: Keys of :attr:`PurifyReport.extra` that describe the last iterate's artifacts (NFT's mask
#: statistics). A report of an earlier iterate (a stop chosen on the clean set) drops them
#: together with the artifacts.
LAST_ITERATE_EXTRAS = frozenset({"mask_mean", "mask_min", "masks_below_half"})


@dataclasses.dataclass
class PurifyReport:
    """What a defense did.

    Attributes:
        method: the defense's name.
        config: its configuration (as a dict).
        steps: optimisation steps taken.
        wall_time_s: seconds of the whole defense (setup, compilation and steps).
        step_time_s: median seconds per step after compilation.
        resumed_from_step: the step a checkpointed run resumed from (0 for a fresh start);
            ``wall_time_s`` and ``step_time_s`` then cover this call only.
        tunable_parameters: number of scalars the defense optimises.
        batch_size: the clean batch size used: the config's, capped at the clean set's size.
        loss_curve: ``{'step': ..., 'loss': ..., <components>}`` every ``log_every`` steps.
        clean_accuracy: eval-mode accuracy on the clean set after the defense (no test data).
        extra: method-specific facts (thresholds chosen on D_v, Fisher statistics, ...).
        artifacts: pytrees worth keeping with the purified checkpoint (masks, spectral
            shifts); not part of :meth:`to_dict`.
    """

    method: str
    config: dict[str, Any]
    steps: int = 0
    wall_time_s: float = 0.0
    step_time_s: float = 0.0
    resumed_from_step: int = 0
    tunable_parameters: int = 0
    batch_size: int = 0
    loss_curve: list[dict[str, float]] = dataclasses.field(default_factory=list)
    clean_accuracy: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "artifacts"
        }


def defense_arguments(
    method: str, config: Any, config_class: type | tuple[type, ...], key: Any
) -> PRNGKeyArray:
    """Checks the config's type and returns the defense's key, with one-line errors.

    The config must be exactly (one of) ``config_class``, not a subclass: a Fast FIP config
    given to FIP would otherwise run FIP and ignore its own fields.

    ``key`` may be a typed key (:func:`jax.random.key`), a legacy ``uint32[2]`` key
    (:func:`jax.random.PRNGKey`, wrapped), an integer seed or ``None`` (seed 0).
    """
    classes = config_class if isinstance(config_class, tuple) else (config_class,)
    if type(config) not in classes:
        raise InvalidInputError(
            f"{method} takes a {' or '.join(c.__name__ for c in classes)}, got "
            f"{type(config).__name__}; make_config({method!r}, overrides) builds one"
        )
    return as_key(method, key)


def as_key(method: str, key: Any) -> PRNGKeyArray:
    """``key`` as one typed key: a typed key (:func:`jax.random.key`), a legacy ``uint32[2]``
    key (:func:`jax.random.PRNGKey`, wrapped), an integer seed in ``[0, 2**32)`` or ``None``
    (seed 0); anything else is a one-line error naming ``method``."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        if not 0 <= int(key) < 2**32:  # jax.random.key would alias or overflow
            raise InvalidInputError(f"{method}'s seed must lie in [0, 2**32), got {int(key)}")
        return jax.random.key(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
    raise InvalidInputError(
        f"{method}'s key must be one jax.random.key or an integer seed, got "
        f"{getattr(key, 'shape', type(key).__name__)!r}"
    )


def check_input_types(clean_set: Any, variables: Any) -> None:
    """One-line errors for a clean set that is not an :class:`ImageDataset` (a tuple of arrays,
    say) and variables that are not a Flax collection mapping with ``params`` (the ``params``
    collection alone, say)."""
    if not isinstance(clean_set, ImageDataset):
        raise InvalidInputError(
            f"the clean set must be an ImageDataset, got {type(clean_set).__name__}; "
            "fippure.data.sources.ImageDataset(images, labels, spec, split) wraps uint8 arrays"
        )
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise InvalidInputError(
            "variables must be the model's collections {'params': ..., 'batch_stats': ...} "
            f"as model.init returns them, got {keys}"
        )
    if extra := sorted(set(variables) - {"params", "batch_stats"}):
        hint = (
            " (intermediates are outputs that model.init recorded: drop them, "
            "{k: v for k, v in variables.items() if k != 'intermediates'})"
            if "intermediates" in extra
            else ""
        )
        raise InvalidInputError(
            f"the variables hold collections the defenses do not carry: {', '.join(extra)}; "
            f"fippure trains models whose state is params and batch_stats{hint}"
        )


def validate_clean_set(
    clean_set: ImageDataset, model: nn.Module, variables: Variables, *, train: bool = True
) -> None:
    """Clear errors for a clean set a defense cannot use: a missing class, images the model's
    variables do not fit, or a class count other than the model's outputs; for a model the
    defenses cannot call (unhashable, no ``train`` keyword, an output other than one logits
    array, :mod:`fippure.models.contract`); and, with ``train``, for a model that cannot run
    in train mode as the defenses run it.

    The model is applied abstractly (:func:`jax.eval_shape`), so the check computes nothing.
    """
    check_input_types(clean_set, variables)
    check_hashable(model, "the defense")
    check_train_keyword(model, "the defense")
    check_clean_set(clean_set.labels, clean_set.num_classes)
    shape = clean_set.spec.image_shape
    probe = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    try:
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, probe)
    except (flax.errors.FlaxError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInputError(
            f"the model's variables do not fit the clean set's {clean_set.spec.name} images of "
            f"shape {shape}: {reason}"
        ) from None
    check_logits(logits, "the defense")
    if logits.shape[-1] != clean_set.num_classes:
        raise InvalidInputError(
            f"the model has {logits.shape[-1]} outputs but the clean set has "
            f"{clean_set.num_classes} classes"
        )
    if not train:
        return
    try:  # the defenses that train give it one random stream, 'dropout'
        jax.eval_shape(
            lambda v, x: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs=dropout_rngs(jax.random.key(0))
            ),
            variables,
            probe,
        )
    except flax.errors.FlaxError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InvalidInputError(
            "the model cannot run in train mode as the defenses run it, model.apply(variables, "
            "x, train=True, mutable=['batch_stats'], rngs={'dropout': key}) (a 'dropout' "
            f"stream is the only one they give): {reason}"
        ) from None
    except NameError as error:  # a BatchNorm that averages over a pmap/shard_map axis
        raise InvalidInputError(
            f"the model cannot run in train mode outside a mapped axis ({error}); a BatchNorm "
            "with axis_name needs model.clone(...) without it, e.g. the model built with "
            "axis_name=None"
        ) from None


def sample_clean_batch(
    key: PRNGKeyArray,
    images: Array,
    labels: Int[Array, " n"],
    batch_size: int,
    spec: DatasetSpec,
    augment: bool,
) -> tuple[Float[Array, "b h w c"], Int[Array, " b"]]:
    """A normalised batch drawn without replacement from the clean set (use inside jit).

    Args:
        key: randomness of the draw and the augmentation.
        images: the whole clean set (uint8, or floats in [0, 1]) on device.
        labels: its labels.
        batch_size: examples per batch; at most the clean-set size.
        spec: the dataset spec (normalisation, crop padding, flips).
        augment: random crop and (where allowed) flip.
    """
    pick_key, augment_key = jax.random.split(key)
    rows = jax.random.choice(pick_key, labels.shape[0], (batch_size,), replace=False)
    x = to_unit_range(images[rows])
    if augment:
        x = augment_images(augment_key, x, spec.crop_padding, spec.flip)
    return normalize(x, spec), labels[rows]


def clean_batch_size(requested: int, clean_set: ImageDataset) -> int:
    """``requested``, capped at the clean-set size (10 images give batches of 10)."""
    if requested < 1:
        raise InvalidInputError(f"batch_size must be positive, got {requested}")
    return min(requested, len(clean_set))


#: ``observer(steps_done, variables)``: called by a defense every ``observe_every`` steps (before
#: the last, whose variables the defense returns) with the model's current variables. For
#: benchmarks that chart test metrics along a run; a defense ignores whatever it returns. The
#: variables are the observer's own copy, so it may keep them. Only by raising
#: :class:`StopEarly` can an observer end a run, which a rule that reads D_v alone may do
#: (:func:`fippure.purify.clean_stop.purify_with_clean_stop`); a benchmark's test-data observer
#: must not. A run resumed from saved progress calls it again at the saved step (so a stop
#: there repeats): an observer that keeps points across a kill should replace a step's point,
#: not append a second one.
Observer = Callable[[int, Variables], None]


class StopEarly(Exception):
    """Raised by an :data:`Observer` to end the defense after the step it observed.

    The defense then finishes as a run of that many steps: it finalises (BatchNorm statistics,
    masks) and reports ``steps`` as the steps taken, so its result is the iterate that the
    observer saw, finalised as the observer would have finalised it. A learning-rate schedule
    keeps the shape it had for the configured ``steps``.
    """


class StepsRun(NamedTuple):
    """What :func:`run_steps` returns."""

    carry: Any
    loss_curve: list[dict[str, float]]
    step_time_s: float
    observe_time_s: float
    resumed_from_step: int
    steps_done: int  # fewer than asked for when an observer raised StopEarly


def steps_taken(config: Any, steps_done: int) -> Any:
    """``config`` with ``steps`` set to ``steps_done`` (unchanged for a full run): what a run
    that an observer stopped early is finalised with (the finalising batches are drawn from
    ``fold_in(key, steps)``). Such a run returns its last iterate, not a tail average, so an
    ``average_last`` is dropped (a window longer than the steps done is not a valid config)."""
    if steps_done == config.steps:
        return config
    changes = {"steps": steps_done}
    if getattr(config, "average_last", 0):
        changes["average_last"] = 0
    return dataclasses.replace(config, **changes)


def run_steps(
    step: Callable[[Any, PRNGKeyArray], tuple[Any, Mapping[str, Array]]],
    carry: Any,
    *,
    steps: int,
    key: PRNGKeyArray,
    desc: str,
    progress: bool = True,
    log_every: int = 50,
    observer: Observer | None = None,
    observe_every: int = 0,
    to_variables: Callable[[Any], Variables] | None = None,
    checkpointing: Checkpointing | None = None,
    fingerprint: Callable[[], Mapping[str, Any]] | None = None,
) -> StepsRun:
    """Runs ``carry, metrics = step(carry, key_t)`` for ``steps`` steps, ``key_t`` being
    ``fold_in(key, t)``.

    ``step`` may donate its carry (``jax.jit(..., donate_argnums=0)``, updating it in place):
    the loop starts from a copy of ``carry``, so the caller's arrays are never donated, and the
    observer gets copies.

    ``metrics`` must hold a scalar ``loss``. Metrics are fetched to the host only every
    ``log_every`` steps and at the end, where a non-finite loss raises
    :class:`NonFiniteLossError`; so does a non-finite carry after the last step or before a
    save (the last update comes after the last loss, and NaN progress is never saved).

    ``observer(steps_done, to_variables(carry))``, if given, is called after every
    ``observe_every``-th step before the last (the last step's variables are what the defense
    returns). Its return value is discarded, so nothing it computes can steer the run; it is
    how a benchmark watches a defense (see :data:`Observer`). Its time is excluded from the step
    times and returned separately. An observer that raises :class:`StopEarly` ends the loop
    after the step it observed (a progress save due at that step is still made).

    With ``checkpointing``, the carry and the loss log are saved every ``checkpointing.every``
    steps and after the last, and a directory that holds progress of the same run
    (``fingerprint()``, called only then: :func:`fippure.purify.resume.run_fingerprint`) is
    resumed from: the
    loop continues at the saved step, and since step ``t`` always uses ``fold_in(key, t)`` it
    ends where an uninterrupted run would. The observer is not called for steps done before,
    except the saved step itself where it falls on ``observe_every``: an observer that stopped
    the run there stops the resumed run there too, and the same call returns the same result.

    Returns:
        a :class:`StepsRun`.
    """
    if steps < 1:
        raise InvalidInputError(f"steps must be positive, got {steps}")
    if log_every < 1:
        raise InvalidInputError(f"log_every must be positive, got {log_every}")
    curve: list[dict[str, float]] = []
    durations = []
    bar = tqdm(
        total=steps,
        disable=not progress,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    tick, mark = time.perf_counter(), 0
    observe_seconds = 0.0
    observing = observer is not None and observe_every > 0
    if observing and to_variables is None:
        raise InvalidInputError("an observer needs to_variables to turn the carry into variables")
    store, start = None, 0
    if checkpointing is not None:
        store = ProgressStore(checkpointing, fingerprint or dict)
        start, carry, curve = store.restore(carry)
        if start > steps:
            raise CheckpointError(f"{checkpointing.directory} holds {start} of {steps} steps")
        if start:
            bar.update(start)
            bar.write(
                f"{desc}: resumed at step {start} of {steps} from {checkpointing.directory}",
                file=sys.stderr,
            )
    # a private copy: a step may donate its carry, which must never be the caller's arrays
    carry = private_copy(carry)
    done, stopped = start, False
    try:
        if observing and 0 < start < steps and start % observe_every == 0:
            # the saved step is observed again: an observer that stopped the run there (a
            # save due at that step is still made) stops the resumed run there too
            begin = time.perf_counter()
            try:
                observer(start, private_copy(to_variables(carry)))
            except StopEarly:
                stopped = True
                bar.write(
                    f"{desc}: stopped by its observer after step {start} of {steps}",
                    file=sys.stderr,
                )
            observe_seconds += time.perf_counter() - begin
        remaining = range(start, start if stopped else steps)
        keys = () if stopped else folded_keys(key, start, steps)
        for t, step_key in zip(remaining, keys, strict=True):
            with step_guard():
                carry, metrics = step(carry, step_key)
            bar.update(1)
            done = t + 1
            logged = t == 0 or done % log_every == 0 or done == steps
            # a resumed run also syncs after its first step, to time the steps after compilation
            if logged or t == start:
                values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
                if not np.isfinite(values["loss"]):
                    raise NonFiniteLossError(
                        f"{desc}: the loss was {values['loss']} at step {done} (it is read "
                        f"every {log_every} steps); lower the learning rate or the "
                        "regularisation strengths"
                    )
                if logged:
                    curve.append({"step": done, **values})
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                now = time.perf_counter()
                if t > start:  # the first step includes compilation
                    durations.append((now - tick) / (done - mark))
                tick, mark = now, done
            stopping = False
            if observing and done % observe_every == 0 and done < steps:
                begin = time.perf_counter()
                try:
                    # a copy: the next step donates the carry's buffers
                    observer(done, private_copy(to_variables(carry)))
                except StopEarly:
                    stopping = True
                spent = time.perf_counter() - begin
                observe_seconds += spent
                tick += spent
                if stopping and not logged:
                    values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
                    curve.append({"step": done, **values})
            saving = store is not None and (done % store.every == 0 or done == steps)
            if (saving or done == steps or stopping) and not bool(all_finite(carry)):
                # the loss of step t is taken before its update, so it cannot see the last
                # update; and progress is never saved with NaNs in it (a resume would return
                # to them, and the directory would refuse the corrected run)
                raise NonFiniteLossError(
                    f"{desc}: the parameters or optimiser state became non-finite by step "
                    f"{done}; lower the learning rate or the regularisation strengths"
                )
            # after the observer, so a resumed run has observed every step up to its save
            if saving:
                begin = time.perf_counter()
                store.save(done, carry, curve)
                tick += time.perf_counter() - begin
            if stopping:
                bar.write(
                    f"{desc}: stopped by its observer after step {done} of {steps}", file=sys.stderr
                )
                break
    finally:
        bar.close()
        if store is not None:
            store.close()
    median = float(np.median(durations)) if durations else 0.0
    done = steps if start == steps else done
    return StepsRun(carry, curve, median, observe_seconds, start, done)


def tree_size(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def clean_accuracy(model: nn.Module, variables: Variables, clean_set: ImageDataset) -> float:
    """Eval-mode accuracy on the clean set (the only accuracy a defense may look at)."""
    from fippure.inference import accuracy

    return accuracy(model, variables, clean_set.images, clean_set.labels, clean_set.spec)


def device_clean_set(clean_set: ImageDataset) -> tuple[Array, Array]:
    """The clean set's images and labels on device."""
    return jax.device_put(clean_set.images), jax.device_put(clean_set.labels.astype(np.int32))


def compile_key(config: Any, *hoisted: str) -> Any:
    """A copy of ``config`` to hand a compiled step as its static argument, with the fields
    ``hoisted`` set to ``None``: those the step receives as traced arguments (a learning rate,
    a penalty's strength) and those it never reads (``log_every``, ``stats_batches``).

    Runs that differ only in those fields then share one compilation: a learning-rate or
    ``eta_F`` sweep compiles its step once, not once per value (the config is part of the
    jit cache key, so before, any field changed forced a recompile). A step that read one of
    them anyway would fail at trace time on ``None``, instead of silently reusing another
    run's value. The copy skips the config's validation (``None`` is no valid value).

    Args:
        config: a frozen dataclass configuration.
        *hoisted: names of its fields.

    Returns:
        The copy, equal (and of equal hash) for configs that agree outside ``hoisted``.

    Raises:
        InvalidInputError: a name that is not a field of ``config``.
    """
    names = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(hoisted) - names)
    if unknown:
        raise InvalidInputError(f"{type(config).__name__} has no field {', '.join(unknown)}")
    key = copy.copy(config)
    for name in hoisted:
        object.__setattr__(key, name, None)
    return key


def step_scalars(**values: float) -> dict[str, Array]:
    """Float hyper-parameters as device scalars for a compiled step's arguments (uploaded
    once, not at every step), weakly typed like the Python floats they replace, so they take
    the dtype of the arrays they meet (a bfloat16 update stays bfloat16)."""
    return jax.device_put({name: float(value) for name, value in values.items()})


def committed_device(tree: Any) -> jax.Device | None:
    """The one device that ``tree``'s committed arrays sit on (a user's
    ``jax.device_put(variables, jax.devices()[2])``); ``None`` when none are committed or they
    span several devices."""
    devices = {
        device
        for leaf in jax.tree_util.tree_leaves(tree)
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed
        for device in leaf.devices()
    }
    return devices.pop() if len(devices) == 1 else None


def on_the_variables_device(function: Callable) -> Callable:
    """Runs ``function`` (a defense taking ``variables``) with JAX's default device set to the
    one its variables are committed to, so that the clean set, keys, step scalars and
    optimiser counts it makes are made there: made on the default device, they were copied at
    the first step, a second copy of the clean set on another device and a transfer that
    :func:`fippure.step_inputs.guard_step_transfers` refuses. Variables on the default device,
    uncommitted, or replicated over several devices run as they are."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def on_device(*args, **kwargs):
        variables = signature.bind_partial(*args, **kwargs).arguments.get("variables")
        device = committed_device(variables)
        if device is None:
            return function(*args, **kwargs)
        with jax.default_device(device):
            return function(*args, **kwargs)

    return on_device


def device_variables(variables: Variables) -> Variables:
    """``variables`` with every array on device (arrays already there are not copied). Host
    arrays (NumPy, as ``flax.serialization`` restores them) would otherwise be uploaded again
    at every step that takes the weights as an argument."""
    return jax.device_put(variables)


def batchnorm_modules(variables: Variables) -> set[tuple[str, ...]]:
    """The module paths of the layers that keep ``batch_stats``: the BatchNorms (a LayerNorm
    also has a ``scale`` and a ``bias``, but no statistics)."""
    return {path[:-1] for path in traverse_util.flatten_dict(variables.get("batch_stats", {}))}


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
    }


def as_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """``{'params': ..., 'batch_stats': ...}`` (without an empty ``batch_stats``)."""
    out = {"params": params}
    if batch_stats:
        out["batch_stats"] = batch_stats
    return out


def apply_model(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    inputs: Array,
    train: bool,
    key: PRNGKeyArray | None = None,
) -> tuple[Array, Any]:
    """Logits and (in train mode) the re-estimated batch statistics.

    Train mode is the model's own: BatchNorm normalises with batch statistics and Dropout
    drops, on the ``'dropout'`` stream folded from ``key`` (the step's key,
    :func:`fippure.models.contract.dropout_rngs`). Eval mode reads no key. The statistics
    keep their dtypes (Flax blends a float32 batch mean into bfloat16 running statistics and
    returns float32).
    """
    if not train:
        return model.apply(as_variables(params, batch_stats), inputs, train=False), batch_stats
    rngs = dropout_rngs(key)
    if batch_stats:
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        return logits, in_dtypes_of(updates["batch_stats"], batch_stats)
    return model.apply({"params": params}, inputs, train=True, rngs=rngs), batch_stats


def zeros_like_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def check_schedule(schedule: str) -> None:
    """A clear error for a learning-rate schedule other than cosine or constant."""
    if schedule not in get_args(Schedule):
        choices = " or ".join(get_args(Schedule))
        raise InvalidInputError(f"unknown schedule {schedule!r}; use {choices}")


def scheduled_sgd(
    learning_rate: float, steps: int, schedule: str, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    """SGD with momentum, coupled weight decay and a ``cosine`` (to 0 over ``steps``) or
    ``constant`` learning-rate schedule."""
    check_schedule(schedule)
    lr = (
        optax.cosine_decay_schedule(learning_rate, steps)
        if schedule == "cosine"
        else optax.constant_schedule(learning_rate)
    )
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, optax.sgd(lr, momentum=momentum or None))
