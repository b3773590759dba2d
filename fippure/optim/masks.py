"""Per-channel BatchNorm masks for NFT, their application, and the layer-wise floor ``mu(l)``.

SPEC section 4 (NFT, Karim et al., "Augmented Neural Fine-Tuning for Efficient Backdoor
Purification", ECCV 2024): one mask ``m`` per BatchNorm channel inside the residual blocks,
initialised to 1, scales the normalised output, ``y = m * (x_hat * gamma) + beta``, i.e. it
multiplies ``gamma`` (Flax's ``scale``). Masks are clipped to ``[mu(l), 1]`` with
``mu(l) = a * exp(-b * l)`` and ``l = 1, 2, ...`` the masked layers in network order.

Masks are a nested dict keyed like the params' BatchNorm modules, e.g.
``masks['stage1_block1']['bn1']`` of shape ``(C,)``. Which BatchNorms are masked is a regular
expression on the '/'-joined module path (:data:`RESIDUAL_BN_PATTERN` by default: the ``bn1``/
``bn2`` of every ``stageS_blockB`` of :class:`fippure.models.PreActResNet18`, so the stem conv
and the final ``bn_final`` before the head are not masked). Pass another pattern for other
models (e.g. ``r"^bn\\d+$"`` for the VGGs).

Network order is the order in which the model calls its modules
(:func:`fippure.models.module_call_order`, which NFT passes as ``order``). Without it, the
functions here fall back on the natural sort of the module paths (digits compared as numbers):
the order of fippure's models' residual blocks, but not of every model (PreAct-ResNet's
``bn_final`` sorts first). Neither depends on dict order, so both survive a checkpoint round
trip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import flax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fippure.config_checks import compile_pattern
from fippure.errors import InvalidInputError

PyTree = Any
Schedule = Literal["exponential", "linear", "constant"]

#: BatchNorms inside residual blocks (``stage1_block1/bn1`` ...), not ``bn_final``.
RESIDUAL_BN_PATTERN = r"(^|/)stage\d+_block\d+/(.*/)?[^/]*bn[^/]*$"


def _natural_key(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def masked_modules(params: PyTree, pattern: str = RESIDUAL_BN_PATTERN) -> list[tuple[str, ...]]:
    """Paths of the BatchNorm modules (dicts with ``scale`` and ``bias``) matching ``pattern``,
    naturally sorted.

    Args:
        params: the model's Flax params (nested dicts).
        pattern: regular expression searched in each module's '/'-joined path.

    Returns:
        The matching module paths as key tuples, e.g. ``("stage1_block1", "bn1")``.

    Raises:
        InvalidInputError: an invalid regular expression.
    """
    regex = compile_pattern(pattern)
    return [m for m in batch_norm_modules(params) if regex.search("/".join(m))]


def batch_norm_modules(params: PyTree) -> list[tuple[str, ...]]:
    """Paths of every module with a ``scale`` and a ``bias``, naturally sorted: the BatchNorms,
    but also any LayerNorm or GroupNorm, which ``params`` alone cannot tell apart (NFT keeps the
    modules that also hold ``batch_stats``)."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    modules = {path[:-1] for path in flat if path[-1] == "scale" and path[:-1] + ("bias",) in flat}
    return sorted(modules, key=lambda p: _natural_key("/".join(p)))


def init_masks(params: PyTree, pattern: str = RESIDUAL_BN_PATTERN) -> dict[str, Any]:
    """Masks of ones, one ``(C,)`` array per matched BatchNorm (dtype of its ``scale``).

    Args:
        params: the model's Flax params (nested dicts).
        pattern: regular expression choosing the modules to mask (see :func:`masked_modules`).

    Returns:
        The masks, nested dicts keyed like the matched modules in ``params``.

    Raises:
        InvalidInputError: when no BatchNorm matches ``pattern``, or an invalid pattern.
    """
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    modules = masked_modules(params, pattern)
    if not modules:
        found = ", ".join("/".join(m) for m in batch_norm_modules(params)) or "none"
        raise InvalidInputError(
            f"no BatchNorm module matches the mask pattern {pattern!r} (NFT's mask_pattern; "
            f"the default masks PreAct-ResNet's residual blocks). The model's BatchNorms: "
            f"{found}; choose some with mask_pattern, e.g. --set 'mask_pattern=^bn\\d+$'"
        )
    return traverse_util.unflatten_dict({m: jnp.ones_like(flat[m + ("scale",)]) for m in modules})


def apply_masks(params: PyTree, masks: PyTree) -> dict[str, Any]:
    """``params`` with each masked BatchNorm's ``scale`` multiplied by its mask (jit-able and
    differentiable in ``masks``).

    Args:
        params: the model's Flax params (nested dicts).
        masks: nested dicts of masks (:func:`init_masks`), each shaped like its module's
            ``scale``.

    Returns:
        New params (nested dicts); each mask is cast to its ``scale``'s dtype.

    Raises:
        InvalidInputError: a mask with no BatchNorm ``scale`` at its path in ``params``, or one
            whose shape is not its ``scale``'s.
    """
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    for module, mask in traverse_util.flatten_dict(masks).items():
        key = module + ("scale",)
        if key not in flat:
            raise InvalidInputError(f"mask {'/'.join(module)} has no BatchNorm scale in params")
        if np.shape(mask) != np.shape(flat[key]):  # a (C, 1) mask would broadcast the scale
            raise InvalidInputError(
                f"mask {'/'.join(module)} has shape {np.shape(mask)}, but its BatchNorm scale "
                f"has {np.shape(flat[key])} (masks of another model?)"
            )
        flat[key] = flat[key] * mask.astype(flat[key].dtype)
    return traverse_util.unflatten_dict(flat)


def mask_layer_indices(
    masks: PyTree, order: Sequence[tuple[str, ...]] | None = None
) -> dict[str, Any]:
    """The network-order index ``l = 1, 2, ...`` of every mask, nested like ``masks``.

    Args:
        masks: nested dicts of masks (:func:`init_masks`).
        order: the module paths in the order the network calls them
            (:func:`fippure.models.module_call_order`). Without it, network order is the
            natural sort of the paths (digits compared as numbers), which is the order in
            which fippure's models define their blocks, but not every model's.

    Returns:
        The same nesting with an int per mask.
    """
    position = {tuple(path): i for i, path in enumerate(order or ())}

    def rank(path: tuple[str, ...]) -> tuple[int, list[Any]]:
        # modules the order does not name come last, naturally sorted
        return position.get(path, len(position)), _natural_key("/".join(path))

    modules = sorted(traverse_util.flatten_dict(masks), key=rank)
    return traverse_util.unflatten_dict({m: i for i, m in enumerate(modules, start=1)})


def mask_floor(
    layer: int, schedule: Schedule = "exponential", a: float = 0.8, b: float = 0.5
) -> float:
    """NFT's lower bound ``mu(l)`` for the ``l``-th masked layer.

    - ``exponential`` (SPEC default): ``a * exp(-b * l)``;
    - ``linear`` **(choice)**: ``max(a - b * l, 0)``;
    - ``constant``: ``a``.

    Args:
        layer: ``l``, the masked layer's index in network order, from 1.
        schedule: ``exponential``, ``linear`` or ``constant``.
        a: the floor at ``l = 0`` (the ``constant`` floor itself).
        b: the exponential decay rate, or the linear step per layer.

    Returns:
        ``mu(l)``, a Python float.

    Raises:
        InvalidInputError: an unknown schedule.
    """
    if schedule == "exponential":
        return a * math.exp(-b * layer)
    if schedule == "linear":
        return max(a - b * layer, 0.0)
    if schedule == "constant":
        return a
    raise InvalidInputError(
        f"unknown mask floor schedule {schedule!r}; use exponential, linear or constant"
    )


def layer_floors(
    masks: PyTree,
    schedule: Schedule = "exponential",
    a: float = 0.8,
    b: float = 0.5,
    order: Sequence[tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """``mu(l)`` as a float per mask, nested like ``masks``: the ``lower`` bound to give
    :func:`fippure.optim.project_box`.

    Args:
        masks: nested dicts of masks (:func:`init_masks`).
        schedule: ``exponential``, ``linear`` or ``constant`` (see :func:`mask_floor`).
        a: :func:`mask_floor`'s ``a``.
        b: :func:`mask_floor`'s ``b``.
        order: the modules' call order (see :func:`mask_layer_indices`).

    Returns:
        The same nesting as ``masks`` with ``mu(l)`` per mask.

    Raises:
        InvalidInputError: an unknown schedule.
    """
    indices = traverse_util.flatten_dict(mask_layer_indices(masks, order))
    return traverse_util.unflatten_dict(
        {path: mask_floor(index, schedule, a, b) for path, index in indices.items()}
    )
