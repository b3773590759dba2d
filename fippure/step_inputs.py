"""Per-step inputs of the Python step loops, made on the device a chunk of steps at a time.

A loop that hands its jitted step the step index (a Python int) or ``fold_in(key, t)`` makes a
host-to-device upload, and for the key an extra dispatch, at every step. Here each chunk of
indices or keys is made in one compiled call and then handed out one by one (unstacking a
device array transfers nothing). The values are those of the per-step calls, bit for bit, so
the loops stay reproducible from their seed and resumable at any step.

:func:`guard_step_transfers` checks that claim: within it, each loop calls its compiled step
under ``jax.transfer_guard``, so a step that would upload a host value or fetch a result
implicitly fails (or is logged) instead of silently syncing the device every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from fippure.errors import InvalidInputError

#: Steps per compiled chunk.
CHUNK = 256

#: The levels of ``jax.transfer_guard``.
GUARD_LEVELS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")

_step_guard_level: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fippure_step_guard_level", default=None
)


@contextlib.contextmanager
def guard_step_transfers(level: str = "disallow") -> Iterator[None]:
    """Within this context, fippure's step loops (defenses, training, joint attack training,
    attack fits, CLB's PGD, Lanczos) call each compiled step under ``jax.transfer_guard(level)``.

    With ``"disallow"``, a step handed a Python number or a NumPy array, or one that pulls a
    result back implicitly, raises; ``"log"`` only reports it. The bookkeeping between steps
    (a loss fetched every log interval, a chunk of step indices, a checkpoint) stays outside
    the guard. On the CPU, JAX guards only host-to-device transfers (its results already live
    in host memory); on a GPU or TPU both directions are guarded.
    """
    if level not in GUARD_LEVELS:
        raise InvalidInputError(
            f"unknown transfer-guard level {level!r}; use one of {GUARD_LEVELS}"
        )
    token = _step_guard_level.set(level)
    try:
        yield
    finally:
        _step_guard_level.reset(token)


def step_guard() -> contextlib.AbstractContextManager:
    """The context a step loop calls one compiled step in: the level set by
    :func:`guard_step_transfers`, or no guard."""
    level = _step_guard_level.get()
    return contextlib.nullcontext() if level is None else jax.transfer_guard(level)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _indices(first: int, count: int, modulus: int | None) -> Array:
    steps = first + jnp.arange(count, dtype=jnp.int32)
    return steps if modulus is None else steps % modulus


@functools.partial(jax.jit, static_argnums=2)
def _folded(key: PRNGKeyArray, first: int, count: int) -> Array:
    return jax.vmap(lambda t: jax.random.fold_in(key, t))(first + jnp.arange(count))


def device_indices(
    start: int, stop: int, modulus: int | None = None, chunk: int = CHUNK
) -> Iterator[Array]:
    """The step indices ``t = start, ..., stop - 1`` (or ``t % modulus``, e.g. the batch of
    the epoch) as int32 device scalars."""
    for first in range(start, stop, chunk):
        # always a whole chunk (one compilation for every run length), cut on the host
        yield from itertools.islice(_indices(first, chunk, modulus), min(chunk, stop - first))


def folded_keys(key: PRNGKeyArray, start: int, stop: int, chunk: int = CHUNK) -> Iterator[Array]:
    """``jax.random.fold_in(key, t)`` for ``t = start, ..., stop - 1``."""
    for first in range(start, stop, chunk):
        # always a whole chunk (one compilation for every run length), cut on the host
        yield from itertools.islice(_folded(key, first, chunk), min(chunk, stop - first))


@jax.jit
def all_finite(tree: Any) -> Array:
    """Whether every floating-point leaf of ``tree`` is finite (one device reduction)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


@jax.jit
def sum_metrics(entries: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """The per-key sums of a list of metric dicts (one compiled call per list length), so a
    loop can keep each step's metrics on the device and total them once per epoch."""
    return {k: sum(entry[k] for entry in entries) for k in entries[0]}


def private_copy(tree: Any) -> Any:
    """``tree`` with every array leaf copied into a buffer of its own (other leaves kept): what
    a loop whose step donates its carry hands out, or starts from, so that no caller's arrays
    are donated."""
    return jax.tree_util.tree_map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, tree)
