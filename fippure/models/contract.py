"""What fippure asks of a classifier it did not build: a Flax Linen module called as
``model.apply(variables, images, train=...)`` that returns one ``(batch, classes)`` array of
logits, and (for the defenses, which compile their steps with the model as a static argument)
hashable fields. In train mode fippure gives the model one random stream, ``'dropout'``
(:func:`dropout_rngs`), so ``nn.Dropout`` layers drop as they would in training. These checks
give one line where JAX or Flax would raise from deep inside."""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax

from fippure.errors import InvalidInputError

#: What a step's key is folded with to give the model's ``'dropout'`` stream: a fold of its
#: own, so that the step's other draws (its batch, augmentation, probes) are the same whether
#: or not the model has Dropout.
DROPOUT_STREAM = 0x0D20_0F00


def dropout_rngs(key: jax.Array | None) -> dict[str, jax.Array]:
    """The random streams a model gets in train mode from a step's ``key``: ``{'dropout':
    fold_in(key, DROPOUT_STREAM)}``, or none for ``key=None``. A model without Dropout, or in
    eval mode, ignores it (the compiled program is the same), so it costs nothing to pass."""
    return {} if key is None else {"dropout": jax.random.fold_in(key, DROPOUT_STREAM)}


def check_train_keyword(model: nn.Module, where: str) -> None:
    """One line for a model whose ``__call__`` takes no ``train`` keyword (the BatchNorm mode
    switch every fippure function passes)."""
    accepted = inspect.signature(type(model).__call__).parameters.values()
    if not any(p.name == "train" or p.kind is p.VAR_KEYWORD for p in accepted):
        raise InvalidInputError(
            f"{where} applies the model with train=True/False, but "
            f"{type(model).__name__}.__call__ takes no train keyword; add one (BatchNorm in "
            "eval mode and Dropout off when it is False)"
        )


def check_hashable(model: nn.Module, where: str) -> None:
    """One line for a module that cannot be hashed (a list or dict field): jitted steps take
    the model as a static argument."""
    try:
        hash(model)
    except TypeError:
        raise InvalidInputError(
            f"{where} compiles its steps with the model as a static argument, but "
            f"{type(model).__name__} cannot be hashed (a list or dict field?); give it tuples "
            "instead"
        ) from None


def check_logits(output: Any, where: str) -> None:
    """One line unless a model's output (concrete or from :func:`jax.eval_shape`) is a single
    ``(batch, classes)`` array, the logits."""
    shape = getattr(output, "shape", None)
    if shape is None or len(shape) != 2:
        got = (
            f"shape {tuple(shape)}"
            if shape is not None
            else f"a {type(output).__name__} of {len(jax.tree_util.tree_leaves(output))} arrays"
        )
        raise InvalidInputError(
            f"{where} needs a model that returns its logits, one (batch, classes) array; this "
            f"one returns {got} (wrap it in a module that returns the logits alone)"
        )
