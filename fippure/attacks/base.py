"""The contract every backdoor attack follows.

An attack is a frozen dataclass whose fields are its hyper-parameters (so it is hashable and
can be a static argument of ``jax.jit``). It owns:

- ``init_state(key, spec)``: any state the trigger needs (a pattern, a warp field, a
  generator's parameters) as a pytree of arrays, created from a key. The state is saved with
  the checkpoint (``extras/attack_state``), so the triggered test set can be re-created.
- ``trigger(state, images, key)``: the pure, jit-able test-time trigger. Images are float
  ``(b, h, w, c)`` in [0, 1], **before** normalisation (uint8 pixels are scaled to [0, 1]
  first); the output stays in [0, 1]. Subclasses implement ``_trigger``.
- ``fit(state, context, *, workdir=None)``: for attacks whose trigger is computed or learned
  before poisoned training (label-consistent PGD, LF, ISSBA's encoder). Default: nothing to
  fit. Given a ``workdir``, a fit saves its progress there and, killed and called again the
  same way, resumes from it (:mod:`fippure.attacks.fit_checkpoints`).
- ``training_transform(state, plan, context)``: the in-graph poisoning of training batches.
  Default: triggered images for the planned rows, with the planned labels.
- ``train_backdoored(...)``: the poisoned training itself. Default: fippure's supervised loop
  with ``training_transform``; attacks trained jointly with the classifier (Input-aware,
  LIRA) override it.
- ``saved_state(state)``: the part of the state the model checkpoint keeps, i.e. what
  ``trigger`` needs. Default: all of it. Attacks whose ``fit`` produces training-only data
  (label-consistent's adversarial images, ISSBA's decoder) drop it here, so checkpoints stay
  small; ``trigger`` must work on the saved state alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.attacks.poisoning import PoisonPlan
from fippure.config_checks import Rule, check_config, check_count
from fippure.data.catalog import DatasetSpec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError, is_concrete
from fippure.inference import value_range
from fippure.models.registry import Variables

State = dict[str, Any]
Images = Float[Array, "b h w c"]


@dataclasses.dataclass
class AttackContext:
    """What an attack may use while it prepares and trains (never the test split).

    Attributes:
        train: the attacker's training set (the defender's clean set already removed).
        plan: the poisoning plan over ``train``.
        spec: the dataset spec.
        key: a key reserved for the attack's own randomness.
        reference: a clean ``(model, variables)`` pair, for attacks that need one (PGD of the
            label-consistent attack, LF's universal pattern). ``None`` if not available.
        progress: show progress bars.
    """

    train: ImageDataset
    plan: PoisonPlan
    spec: DatasetSpec
    key: PRNGKeyArray
    reference: tuple[nn.Module, Variables] | None = None
    progress: bool = True

    def __post_init__(self):
        if self.plan.num_examples != len(self.train):
            # its rows would index another set: other images poisoned, some out of range
            raise InvalidInputError(
                f"the poisoning plan was made for {self.plan.num_examples} examples, but the "
                f"training set has {len(self.train)}; make it from this set's labels"
            )


@dataclasses.dataclass(frozen=True)
class Attack:
    """Base class of the trigger families; see the module docstring for the contract."""

    #: Registry name (``badnets``, ``blend``, ...).
    name: ClassVar[str] = ""
    #: Clean-label attacks poison target-class images only and keep their labels.
    clean_label: ClassVar[bool] = False
    #: Whether ``fit`` needs ``context.reference`` (a clean model).
    needs_reference: ClassVar[bool] = False
    #: Default save interval, in the fit's own steps, of a ``fit`` given a ``workdir``.
    fit_checkpoint_every: ClassVar[int] = 100
    #: Ranges of the hyper-parameters by field name; their types come from the annotations
    #: (:func:`fippure.config_checks.check_config`, run when the attack is built).
    rules: ClassVar[Mapping[str, Rule]] = {}

    def __post_init__(self):
        check_config(self, self.rules)

    def init_state(self, key: PRNGKeyArray, spec: DatasetSpec) -> State:
        """The trigger's state, created from ``key``. Default: no state."""
        del key, spec
        return {}

    def trigger(self, state: State, images: Images, key: PRNGKeyArray | None = None) -> Images:
        """Applies the trigger (pure, jit-able) to a ``(b, h, w, c)`` batch.

        Float images are taken to be in [0, 1] and keep their dtype (the trigger is computed in
        at least float32; float64 NumPy images become float32 unless x64 is enabled, as
        everywhere in JAX). Integer images (uint8
        pixels, as :func:`fippure.data.load_dataset` returns them) are first scaled to float32
        [0, 1], so the result is always a float image in [0, 1]. Any other dtype, or a batch
        that is not rank 4, is refused, and so is a state made for images of another shape
        (:meth:`check_state_fits`). Called eagerly, it also refuses pixel values outside the
        dtype's range (floats outside [0, 1], such as 0-255 values or normalised images);
        under ``jax.jit`` the values are not judged. Subclasses implement :meth:`_trigger`.
        """
        images = jnp.asarray(images)
        if images.ndim != 4:
            raise InvalidInputError(
                f"{self.name} trigger expects a (batch, height, width, channels) array, "
                f"got shape {tuple(images.shape)}"
            )
        self.check_state_fits(state, tuple(images.shape[1:]))
        if is_concrete(images):  # eager calls only: a traced batch cannot be judged
            check_pixel_range(images, f"{self.name} trigger")
        if jnp.issubdtype(images.dtype, jnp.integer):
            from fippure.data.pipeline import to_unit_range

            images = to_unit_range(images)
        elif not jnp.issubdtype(images.dtype, jnp.floating):
            raise InvalidInputError(
                f"{self.name} trigger expects float images in [0, 1] or integer pixels "
                f"0..255, got dtype {images.dtype}"
            )
        # Computed in at least float32 and rounded once to the images' own dtype: in float16
        # or bfloat16, BPP's colour levels and FTrojan's DCT round visibly (a pixel a whole
        # 36/255 level off, half of a 1.5/255 frequency trigger lost).
        working = jnp.promote_types(images.dtype, jnp.float32)
        return self._trigger(state, images.astype(working), key).astype(images.dtype)

    def check_state_fits(self, state: State, image_shape: tuple[int, int, int]) -> None:
        """One-line error for a ``state`` that was made for images of another shape: each of
        its arrays must have the shape that :meth:`init_state` gives for ``image_shape``
        (traced once per shape, no compute), and ``init_state``'s own checks apply (a patch
        larger than the image, say). Arrays that ``init_state`` does not make (added by
        :meth:`fit`) are not judged."""
        expected = _state_shapes(self, image_shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            name = jax.tree_util.keystr(path)
            want = expected.get(name)
            if want is not None and tuple(jnp.shape(leaf)) != want:
                size = "x".join(map(str, image_shape))
                raise InvalidInputError(
                    f"the {self.name} state does not fit {size} images: {name} has shape "
                    f"{tuple(jnp.shape(leaf))}, not {want}; make the state with init_state for "
                    "these images"
                )

    def _trigger(self, state: State, images: Images, key: PRNGKeyArray | None) -> Images:
        """The trigger itself, on float [0, 1] images of rank 4."""
        raise NotImplementedError

    def poison(self, state: State, images: Images, key: PRNGKeyArray) -> Images:
        """What a poisoned *training* image looks like. Default: the test-time trigger."""
        return self.trigger(state, images, key)

    def check_plan(self, plan: PoisonPlan) -> None:
        """One-line error for a plan of the other kind: a clean-label attack (SIG, CLB) with
        a dirty-label plan would poison non-target images relabelled to the target, and the
        other way round."""
        if plan.clean_label != self.clean_label:
            kind = "clean-label" if self.clean_label else "dirty-label"
            raise InvalidInputError(
                f"{self.name} is a {kind} attack but the poisoning plan is not; make it with "
                f"make_poison_plan(..., clean_label={self.clean_label})"
            )

    def check_training(self, spec: DatasetSpec, config: Any) -> None:
        """One-line errors for settings this attack cannot train with, raised before a run
        claims its output directory. Default: traces the trigger once on one blank image
        (:func:`jax.eval_shape`, no compute), so a trigger that does not fit the images fails
        now rather than after a fit or at the first training step."""
        del config
        key = jax.random.key(0)
        jax.eval_shape(
            lambda k: self.trigger(
                self.init_state(k, spec), jnp.zeros((1, *spec.image_shape), jnp.float32), k
            ),
            key,
        )

    def fit(
        self,
        state: State,
        context: AttackContext,
        *,
        workdir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        stop_after_steps: int | None = None,
    ) -> State:
        """Computes or learns the trigger before poisoned training. Default: no-op.

        Fits that run long take ``workdir`` (save progress there every ``checkpoint_every``
        steps, default :attr:`fit_checkpoint_every`, and resume from it; ``None``: write
        nothing) and ``stop_after_steps`` (stop after saving, for tests).
        """
        del context, workdir, checkpoint_every, stop_after_steps
        return state

    def training_transform(
        self, state: State, plan: PoisonPlan, context: AttackContext
    ) -> Callable[..., tuple[Images, Array]]:
        """In-graph poisoning ``(key, images, labels, rows) -> (images, labels)``."""
        del context
        self.check_plan(plan)
        is_poisoned, poison_label = (jnp.asarray(a) for a in plan.dense())

        def transform(key, images, labels, rows):
            mask = is_poisoned[rows]
            poisoned = self.poison(state, images, key)
            images = jnp.where(mask[:, None, None, None], poisoned, images)
            return images, jnp.where(mask, poison_label[rows], labels)

        return transform

    def train_backdoored(
        self,
        state: State,
        context: AttackContext,
        model: nn.Module,
        variables: Variables,
        config: Any,
        *,
        workdir: str | os.PathLike | None = None,
        evaluate: Callable[[Variables, State], dict[str, float]] | None = None,
    ) -> tuple[dict[str, Any], State, Any]:
        """Trains the backdoored classifier; returns ``(variables, state, TrainReport)``.

        ``config`` is a :class:`fippure.training.TrainConfig`; ``evaluate(variables, state)``
        returns test metrics.
        """
        from fippure.training import train

        transform = self.training_transform(state, context.plan, context)
        variables, report = train(
            model,
            context.train,
            config,
            variables=variables,
            workdir=workdir,
            evaluate=None if evaluate is None else (lambda v: evaluate(v, state)),
            batch_transform=transform,
            progress=context.progress,
        )
        return variables, state, report

    def saved_state(self, state: State) -> State:
        """What the checkpoint keeps of ``state`` (enough for ``trigger``). Default: all of it."""
        return state

    def options(self) -> dict[str, Any]:
        """The attack's hyper-parameters (saved in checkpoint metadata)."""
        return dataclasses.asdict(self)


def apply_trigger(
    attack: Attack,
    state: State,
    images: np.ndarray,
    key: PRNGKeyArray,
    batch_size: int = 1000,
) -> np.ndarray:
    """Triggers uint8 or [0, 1] float images in jitted batches; returns float32 [0, 1].

    Each batch gets ``fold_in(key, batch_index)``, so the result is fixed by the key and
    ``batch_size`` (none of the built-in triggers draws randomness, so theirs by neither).

    Args:
        attack: the attack whose ``trigger`` runs (its jitted trigger is cached per attack).
        state: the attack's trigger state (from ``init_state``/``fit``, or a checkpoint).
        images: host ``(n, h, w, c)`` images: uint8 pixels 0..255 or floats in [0, 1].
        key: random key of a trigger that draws randomness; batch ``i`` uses
            ``fold_in(key, i)``.
        batch_size: images per jitted call (with the batch index, it decides the key each
            image's trigger draws from).

    Returns:
        float32 ``(n, h, w, c)`` triggered images, clipped to [0, 1].

    Raises:
        InvalidInputError: float images outside [0, 1] (pixel values as floats, normalised
            images) or integers outside 0..255, images that are not a rank-4 batch or that
            ``state`` was not made for, a ``batch_size`` below 1, or a ``key`` that is not a
            typed key.
    """
    from fippure.data.pipeline import to_unit_range

    images = np.asarray(images)
    check_pixel_range(images, "apply_trigger")
    check_count(batch_size, "batch_size", 1)
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise InvalidInputError(
            f"apply_trigger takes a typed key (jax.random.key(seed)), got {type(key).__name__}"
        )
    run = _jitted_trigger(attack)
    out = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        chunk = to_unit_range(jnp.asarray(images[start : start + batch_size]))
        out.append(np.asarray(run(state, chunk, jax.random.fold_in(key, i))))
    if not out:
        return np.zeros((0, *images.shape[1:]), np.float32)
    return np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)


def check_pixel_range(images: Any, where: str) -> None:
    """One-line error for pixel values a trigger would misread: floats outside [0, 1] (0-255
    values, or normalised images) or integers outside 0..255 (concrete arrays only)."""
    if not np.size(images):
        return
    if isinstance(images, np.ndarray):  # on the host: no upload just to check
        low, high = float(images.min()), float(images.max())
    else:  # one compiled pass and one transfer
        low, high, _ = (float(v) for v in jax.device_get(value_range(images)))
    if jnp.issubdtype(jnp.result_type(images), jnp.floating) and not 0.0 <= low <= high <= 1.0:
        raise InvalidInputError(
            f"{where}: float images are read as [0, 1] but these span [{low:g}, {high:g}]; "
            "pass uint8 pixels, divide 0-255 values by 255, or undo the normalisation"
        )
    if jnp.issubdtype(jnp.result_type(images), jnp.integer) and not 0 <= low <= high <= 255:
        raise InvalidInputError(
            f"{where}: integer images are read as pixels 0..255 but these span "
            f"{int(low)}..{int(high)}"
        )


@functools.lru_cache(maxsize=64)
def _state_shapes(attack: Attack, image_shape: tuple[int, int, int]) -> dict[str, tuple]:
    """``{path: shape}`` of ``attack.init_state`` for images of ``image_shape`` (traced with
    :func:`jax.eval_shape`; ``init_state`` reads only the spec's image shape)."""
    channels = image_shape[-1]
    spec = DatasetSpec(
        name="images", num_classes=1, image_shape=image_shape, mean=(0.0,) * channels,
        std=(1.0,) * channels, flip=False, crop_padding=0, tfds_name=None,
    )  # fmt: skip
    shapes = jax.eval_shape(lambda k: attack.init_state(k, spec), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


@functools.lru_cache(maxsize=32)
def _jitted_trigger(attack: Attack) -> Callable:
    """``attack.trigger`` jitted, one per attack configuration, for the last 32 configurations
    used: a sweep over a trigger's settings (a blend ratio, say) does not keep every one's
    compiled programs for the life of the process."""
    return jax.jit(attack.trigger)
