"""Errors that fippure raises on bad input.

Every user-facing failure is a :class:`FippureError` with a one-line message that names what is
wrong and, where it helps, what would be right. The CLI prints the message without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import jax


class FippureError(Exception):
    """Base class of every error fippure raises on purpose."""


class UnknownNameError(FippureError, KeyError):
    """A dataset, model, attack, defense or option name that fippure does not know."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        same_but_case = [k for k in known if k.lower() == str(name).lower()]
        # str(): a name that is not a string (None from a config, say) is unknown too
        close = same_but_case or difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known)}.{hint}")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class DatasetUnavailableError(FippureError):
    """The dataset is neither prepared locally nor downloadable."""


class InvalidInputError(FippureError, ValueError):
    """An argument has the wrong shape, range or type."""


class CheckpointError(FippureError):
    """A checkpoint is missing, corrupt, or belongs to another model."""


class NonFiniteLossError(FippureError, FloatingPointError):
    """Training produced a NaN or infinite loss, or a model NaN or infinite outputs."""


def require(condition: bool, message: str) -> None:
    """Raises :class:`InvalidInputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvalidInputError(message)


def is_concrete(tree: Any) -> bool:
    """Whether every leaf of ``tree`` holds a value (no :class:`jax.core.Tracer`), so that it
    can be validated eagerly. Under ``jit``, ``grad`` or ``vmap`` (or a schedule injected with
    ``optax.inject_hyperparams``) the checks are skipped rather than failing on a tracer.
    Judge a concrete value with NumPy (``np.asarray(x) > 0``): inside a trace, a JAX
    comparison on even a concrete array is traced, and its truth value cannot be read."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))
