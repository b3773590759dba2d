"""Optax transformations and reparameterisations for the purification methods.

- :func:`fisher_anchor` (FIP, NGF): adds ``strength * F * (theta - theta0)`` to the updates.
- :func:`natural_gradient` (NGF): ``(F + damping I)^-1`` preconditioning, by conjugate gradient
  on Fisher-vector products or by a Cholesky solve for a dense softmax head.
- :func:`project_box` (NFT): keeps parameters (masks) in per-leaf bounds.
- :func:`adaptive_sam`, :func:`asam_gradient` (FT-SAM): (adaptive) sharpness-aware steps.
- :mod:`~fippure.optim.spectral` (Fast FIP): singular-value shifts of every kernel.
- :mod:`~fippure.optim.masks` (NFT): per-channel BatchNorm masks and the floor ``mu(l)``.

Curvature-based transformations (``natural_gradient``) must stay outside ``optax.masked`` and
``optax.partition``: their ``MaskedNode`` placeholders would reach the Fisher-vector product.
``fisher_anchor`` and ``project_box`` are mask-aware (frozen leaves pass through).

The transformations that take extras (``natural_gradient``'s ``fvp_fn`` or ``features`` and
``logits``, ``adaptive_sam``'s ``grad_fn``) are called as ``tx.update(grads, state, params,
**extras)``. Flax's ``TrainState.apply_gradients`` cannot pass extras (its keywords replace
the state's fields): call ``tx.update`` and ``optax.apply_updates``, then
``state.replace(params=..., opt_state=...)``.
"""

from fippure.optim.anchor import FisherAnchorState, anchor_penalty, fisher_anchor
from fippure.optim.masks import (
    RESIDUAL_BN_PATTERN,
    apply_masks,
    init_masks,
    layer_floors,
    mask_floor,
    mask_layer_indices,
    masked_modules,
)
from fippure.optim.natural_gradient import NaturalGradientState, head_fisher, natural_gradient
from fippure.optim.projection import ProjectBoxState, clip_to_box, project_box
from fippure.optim.sam import adaptive_sam, asam_gradient, asam_perturbation, normalize_adaptive
from fippure.optim.spectral import (
    KERNEL_PATTERN,
    SpectralFactor,
    decompose,
    factored,
    init_shifts,
    layer_input_axes,
    num_shifts,
    rebuild_kernel,
    rebuild_params,
    shift_counts,
)

__all__ = [
    "KERNEL_PATTERN",
    "RESIDUAL_BN_PATTERN",
    "FisherAnchorState",
    "NaturalGradientState",
    "ProjectBoxState",
    "SpectralFactor",
    "adaptive_sam",
    "anchor_penalty",
    "apply_masks",
    "asam_gradient",
    "asam_perturbation",
    "clip_to_box",
    "decompose",
    "factored",
    "fisher_anchor",
    "head_fisher",
    "init_masks",
    "init_shifts",
    "layer_floors",
    "layer_input_axes",
    "mask_floor",
    "mask_layer_indices",
    "masked_modules",
    "natural_gradient",
    "normalize_adaptive",
    "num_shifts",
    "project_box",
    "rebuild_kernel",
    "rebuild_params",
    "shift_counts",
]
