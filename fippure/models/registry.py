"""Models built by name, and the documented ways to apply them.

Every model is a Flax Linen module called as ``model.apply(variables, x, train=...)`` with the
collections ``params`` and (for BN models) ``batch_stats``. In train mode BatchNorm uses batch
statistics and ``batch_stats`` must be passed as mutable; in eval mode it uses the running
averages. Every model ends in a dense layer named ``head`` and sows its penultimate features
under ``intermediates/features``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.config_checks import check_type, is_integer
from fippure.errors import InvalidInputError, UnknownNameError
from fippure.models.contract import dropout_rngs
from fippure.models.layers import FEATURES, ComputeDtype
from fippure.models.preact_resnet import PreActResNet18
from fippure.models.small_cnn import SmallCNN
from fippure.models.vgg import VGG
from fippure.models.vit import ViT

Variables = Mapping[str, Any]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": PreActResNet18,
    "vgg11_bn": functools.partial(VGG, depth=11),
    "vgg16_bn": functools.partial(VGG, depth=16),
    "vit_small": ViT,
    "small_cnn": SmallCNN,
}


def model_fields(name: str) -> set[str]:
    """The keyword arguments that model ``name`` accepts, ``num_classes`` among them.

    Args:
        name: registry name, a key of :data:`MODELS`.

    Returns:
        The names of the model's dataclass fields, ``num_classes`` included; ``parent``,
        ``name`` and the fields its registry entry fixes (the VGGs' ``depth``) are left out.

    Raises:
        UnknownNameError: for an unknown model name.
    """
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS)
    factory = MODELS[name]
    cls = factory.func if isinstance(factory, functools.partial) else factory
    fixed = set(factory.keywords) if isinstance(factory, functools.partial) else set()
    return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")} - fixed


def _field_types(name: str) -> dict[str, Any]:
    """The annotated types of model ``name``'s fields (``int``, ``float``, ...)."""
    factory = MODELS[name]
    cls = factory.func if isinstance(factory, functools.partial) else factory
    return typing.get_type_hints(cls)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds model ``name`` (see :data:`MODELS`) with ``num_classes`` outputs.

    Args:
        name: registry name, e.g. ``preact_resnet18``.
        num_classes: K.
        **kwargs: model fields such as ``width``; ``None`` values are ignored.

    Raises:
        UnknownNameError: for an unknown model name.
        InvalidInputError: for an argument the model does not take, or a non-positive size.
    """
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    unknown = set(kwargs) - model_fields(name)
    if unknown:
        raise InvalidInputError(
            f"model {name} takes no argument(s) {sorted(unknown)}; "
            f"it takes {sorted(model_fields(name) - {'num_classes'})}"
        )
    if not is_integer(num_classes) or num_classes < 2:
        raise InvalidInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    hints = _field_types(name)
    for key, value in kwargs.items():
        check_type(value, hints.get(key), f"model {name}: {key}")
        # every size-like field (width, depth, heads...) is >= 1
        if is_integer(value) and value < 1:
            raise InvalidInputError(f"model {name}: {key} must be >= 1, got {value}")
    return MODELS[name](num_classes=int(num_classes), **kwargs)


def with_dtype(model: nn.Module, dtype: str | None) -> nn.Module:
    """``model`` computing in ``dtype`` (its ``dtype`` field; see :data:`ComputeDtype`).

    The parameters and their shapes do not depend on the computation dtype, so variables
    trained in one dtype apply unchanged in another: for example, purify a float32 checkpoint
    with bfloat16 activations on an accelerator. ``None`` returns the model as it is.

    Args:
        model: a module with a ``dtype`` field (fippure's models have one).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps the model's.

    Returns:
        A clone of ``model`` with that ``dtype`` (``model`` itself for ``None``).

    Raises:
        InvalidInputError: for a dtype outside :data:`ComputeDtype`, or a model without a
            ``dtype`` field.
    """
    if dtype is None:
        return model
    check_type(dtype, ComputeDtype, "dtype")
    if "dtype" not in {f.name for f in dataclasses.fields(model)}:
        raise InvalidInputError(f"{type(model).__name__} has no dtype field to set")
    return model.clone(dtype=dtype)


def init_variables(
    model: nn.Module, key: PRNGKeyArray, image_shape: tuple[int, int, int]
) -> dict[str, Any]:
    """Initial ``{'params': ..., 'batch_stats': ...}`` for inputs of ``image_shape``
    (height, width, channels; no batch dimension).

    Args:
        model: the module to initialise.
        key: random key of the initial parameters.
        image_shape: ``(height, width, channels)``, positive integers.

    Returns:
        The model's collections (``params``, and ``batch_stats`` for BatchNorm models), without
        the sown ``intermediates``.

    Raises:
        InvalidInputError: an ``image_shape`` that is not three positive integers.
    """
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(is_integer(d) and d >= 1 for d in shape):
        raise InvalidInputError(
            f"image_shape must be (height, width, channels) of positive integers, without a "
            f"batch dimension; got {shape}"
        )
    variables = jax.jit(model.init, static_argnames="train")(
        key, jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    return {k: v for k, v in variables.items() if k != "intermediates"}


#: Flax's errors for variables that are not the model's (a parameter of another shape, a
#: missing parameter or collection, something that is not a dict of collections).
_MISFIT_ERRORS = (
    flax.errors.ScopeParamShapeError,
    flax.errors.ScopeParamNotFoundError,
    flax.errors.ScopeVariableNotFoundError,
    flax.errors.ScopeCollectionNotFound,
    flax.errors.ApplyScopeInvalidVariablesTypeError,
    flax.errors.ApplyScopeInvalidVariablesStructureError,
)


@contextlib.contextmanager
def variables_must_fit(model: nn.Module) -> Iterator[None]:
    """Within this context, applying ``model`` to variables that are not its own (another
    architecture or width, another image shape for a ViT, no ``batch_stats`` for a BatchNorm
    model) raises a one-line :class:`InvalidInputError` instead of Flax's traceback.

    Args:
        model: the module applied within the block (named in the message).

    Yields:
        None.

    Raises:
        InvalidInputError: when one of Flax's variable-mismatch errors leaves the block.
    """
    try:
        yield
    except _MISFIT_ERRORS as error:
        detail = str(error).split(" (https://flax")[0].splitlines()[0]
        raise InvalidInputError(
            f"the variables do not fit this {type(model).__name__}: {detail}"
        ) from None


def output_shape(
    model: nn.Module, variables: Variables, image_shape: tuple[int, int, int]
) -> tuple[int, ...]:
    """The shape of one image's eval-mode output (``(K,)`` for a classifier), traced without
    computing anything; a one-line error when ``variables`` do not fit (see
    :func:`variables_must_fit`).

    Args:
        model: the module.
        variables: its collections.
        image_shape: ``(height, width, channels)`` of one image.

    Returns:
        The output shape without the batch axis.

    Raises:
        InvalidInputError: ``variables`` that do not fit ``model``.
    """
    probe = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with variables_must_fit(model):
        out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, probe)
    return tuple(out.shape[1:])


def in_dtypes_of(new: Any, old: Any) -> Any:
    """``new`` (a tree of ``old``'s structure, a dict or a FrozenDict) with each leaf cast to
    the dtype of ``old``'s: Flax blends a float32 batch mean into bfloat16 running statistics
    and returns float32 ones, which would change a step's carry after its first call."""
    leaves, treedef = jax.tree_util.tree_flatten(new)
    dtypes = [leaf.dtype for leaf in jax.tree_util.tree_leaves(old)]
    return treedef.unflatten([x.astype(d) for x, d in zip(leaves, dtypes, strict=True)])


def forward(
    model: nn.Module,
    variables: Variables,
    inputs: Float[Array, "b h w c"],
    train: bool,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "b k"], Variables]:
    """Logits and the updated variables.

    In train mode BatchNorm normalises with batch statistics and the returned variables carry
    the updated running averages, and Dropout drops on the stream folded from ``key``
    (:func:`fippure.models.contract.dropout_rngs`); in eval mode they are returned unchanged.

    Args:
        model: the classifier.
        variables: its collections (``params`` and, for BatchNorm models, ``batch_stats``).
        inputs: a normalised ``(b, h, w, c)`` batch.
        train: train mode (True) or eval mode (False).
        key: the randomness of the model's Dropout in train mode (needed only if it has any).

    Returns:
        ``(logits, variables)``: ``(b, K)`` logits and the variables, with the updated
        ``batch_stats`` in train mode.

    Raises:
        InvalidInputError: ``variables`` that do not fit ``model``.
    """
    rngs = dropout_rngs(key)
    with variables_must_fit(model):
        if train and "batch_stats" in variables:
            logits, updates = model.apply(
                variables, inputs, train=True, mutable=["batch_stats"], rngs=rngs
            )
            stats = in_dtypes_of(updates["batch_stats"], variables["batch_stats"])
            return logits, {**variables, "batch_stats": stats}
        return model.apply(variables, inputs, train=train, rngs=rngs), variables


def penultimate_features(
    model: nn.Module,
    variables: Variables,
    inputs: Float[Array, "b h w c"],
    train: bool = False,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "b d"]:
    """The inputs of the ``head`` layer (eval mode by default), which the model records with
    ``self.sow("intermediates", FEATURES, h)`` (fippure's models do).

    Args:
        model: the classifier.
        variables: its collections.
        inputs: a normalised ``(b, h, w, c)`` batch.
        train: apply in train mode (BatchNorm on batch statistics, which are then discarded).
        key: the randomness of the model's Dropout in train mode (as :func:`forward`).

    Returns:
        The ``(b, d)`` features the model sowed (the first, if it sowed more than once).

    Raises:
        InvalidInputError: a model that does not record them, or ``variables`` that do not fit
            ``model``.
    """
    return features_and_logits(model, variables, inputs, train, key)[0]


def features_and_logits(
    model: nn.Module,
    variables: Variables,
    inputs: Float[Array, "b h w c"],
    train: bool = False,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "b d"], Any]:
    """:func:`penultimate_features` and the model's output, from one forward pass.

    Raises:
        InvalidInputError: as :func:`penultimate_features`.
    """
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    rngs = dropout_rngs(key)
    with variables_must_fit(model):
        output, state = model.apply(variables, inputs, train=train, mutable=mutable, rngs=rngs)
    recorded = state.get("intermediates", {}).get(FEATURES)
    if recorded is None:
        raise InvalidInputError(
            f"{type(model).__name__} does not record its head's inputs; sow them before the "
            f"head with self.sow('intermediates', {FEATURES!r}, h), as fippure's models do"
        )
    return recorded[0], output


def module_call_order(
    model: nn.Module, variables: Variables, image_shape: tuple[int, int, int]
) -> list[tuple[str, ...]]:
    """The paths of ``model``'s submodules in the order their first call begins, in eval mode
    (traced with :func:`jax.eval_shape`, no compute): the network order of its layers, which
    the order in which they are named or defined need not be.

    Args:
        model: the classifier.
        variables: its collections.
        image_shape: ``(h, w, c)`` of one input.

    Returns:
        Module paths as key tuples, e.g. ``("stage1_block1", "bn1")``; the root is left out.
    """
    order: list[tuple[str, ...]] = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    probe = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(record), variables_must_fit(model):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, probe)
    return order


def activations(
    model: nn.Module,
    variables: Variables,
    inputs: Float[Array, "b h w c"],
    *,
    train: bool = False,
    select: Callable[[nn.Module, str], bool] | None = None,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "b k"], dict[str, Array]]:
    """Logits and every submodule's output, keyed by its '/'-joined module path.

    Uses Flax's ``capture_intermediates``. By default only convolutions, BatchNorms and dense
    layers are kept; pass ``select(module, method_name) -> bool`` to choose others.

    Args:
        model: the classifier.
        variables: its collections.
        inputs: a normalised ``(b, h, w, c)`` batch.
        train: apply in train mode (updated BatchNorm statistics are discarded).
        select: ``(module, method_name) -> bool``, which calls to capture. ``None``: the
            convolutions', BatchNorms' and dense layers' ``__call__``.
        key: the randomness of the model's Dropout in train mode (as :func:`forward`).

    Returns:
        ``(logits, outputs)``: the model's output, and each captured output keyed by its
        module path (e.g. ``stage1_block1/conv1``), with ``.method`` added for a method other
        than ``__call__``, ``#i`` for the i-th call of a module called more than once (shared
        weights), and ``[j]`` for the parts of a tuple output (e.g. ``pair#1[0]``). Values the
        model sows into ``intermediates`` are included: fippure's models sow their penultimate
        features, in float32, as ``features``.

    Raises:
        InvalidInputError: ``variables`` that do not fit ``model``.
    """
    if select is None:

        def select(module, method_name):
            return method_name == "__call__" and isinstance(
                module, nn.Conv | nn.BatchNorm | nn.Dense
            )

    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    with variables_must_fit(model):
        logits, state = model.apply(
            variables,
            inputs,
            train=train,
            capture_intermediates=select,
            mutable=mutable,
            rngs=dropout_rngs(key),
        )
    return logits, _captured_outputs(state["intermediates"])


def _captured_outputs(intermediates: Any) -> dict[str, Array]:
    """Flax's ``intermediates`` collection, ``{module: {method or sown name: (values, ...)}}``,
    as one flat dict with a key per array: the module path; ``.name`` for a method other than
    ``__call__`` or a sown value (a sown value of the model itself is keyed by its bare name);
    ``#i`` for the i-th call of a module called more than once; ``[j]`` for each part of a
    tuple or dict output. Nothing is dropped: a second call does not overwrite the first."""
    captured = []
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        at = next(i for i, p in enumerate(path) if isinstance(p, jax.tree_util.SequenceKey))
        *modules, method = (p.key for p in path[:at])
        part = "".join(f"[{getattr(p, 'key', getattr(p, 'idx', p))}]" for p in path[at + 1 :])
        captured.append(("/".join(modules), method, path[at].idx, part, value))
    calls: dict[tuple[str, str], int] = {}
    for module, method, call, _, _ in captured:
        calls[module, method] = max(calls.get((module, method), 0), call + 1)
    out = {}
    for module, method, call, part, value in captured:
        if not module and method == "__call__":
            continue  # the model's own output: the logits, returned beside these
        key = module if method == "__call__" else f"{module}.{method}".lstrip(".")
        if calls[module, method] > 1:
            key += f"#{call}"
        out[key + part] = value
    return out


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree.

    Args:
        tree: a pytree of arrays (e.g. ``variables["params"]``).

    Returns:
        The total size of its leaves, as an int.
    """
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
