"""Checkpointing a defense's step loop, so that a killed run resumes where it stopped.

A defense's loop carries one pytree (tunable parameters, BatchNorm statistics, optimiser state,
...) and draws step ``t``'s randomness as ``fold_in(key, t)``. Saving the carry and the loss
log every few steps therefore lets a later call with the same inputs continue from the last
save and reach the same result as an uninterrupted run. The set-up before the loop (the Fisher
diagonal, TrF0, ...) is deterministic and is recomputed.

The directory holds orbax steps (the carry and the loss log, saved together) and ``run.json``,
a fingerprint of the run (defense, config, key, clean set, starting variables; see
:func:`fippure.checkpoints.claim_run_directory`). Progress of another run is refused with
:class:`fippure.errors.CheckpointError`, not silently mixed in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from fippure.checkpoints import ProgressDirectory, array_digest
from fippure.config_checks import AT_LEAST_ONE, check_config


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and how often a defense saves its progress.

    Attributes:
        directory: the progress directory (created if missing; resumed from if it holds
            progress of the same run).
        every: save after every this many steps, and after the last.
    """

    directory: str | os.PathLike
    every: int = 50

    def __post_init__(self):
        check_config(self, {"every": AT_LEAST_ONE})


def run_fingerprint(
    method: str,
    model: Any,
    config: Any,
    variables: Any,
    images: Any,
    labels: Any,
    key: jax.Array,
) -> dict[str, Any]:
    """What identifies a defense run: its name, model (the module's fields, e.g. its compute
    dtype: the same variables fit another module), config, key, clean set and starting
    variables (the arrays as SHA-1 digests). :func:`fippure.checkpoints.claim_run_directory`
    writes it as JSON."""
    return {
        "method": method,
        "model": repr(model),
        "config": dataclasses.asdict(config),
        "key": jax.random.key_data(key),
        "clean_set": array_digest([images, labels]),
        "variables": array_digest(jax.tree_util.tree_leaves(variables)),
    }


class ProgressStore(ProgressDirectory):
    """The progress directory of one defense run (:class:`Checkpointing`); ``fingerprint`` is
    called once, to stamp or check the directory."""

    def __init__(self, checkpointing: Checkpointing, fingerprint: Callable[[], Mapping[str, Any]]):
        super().__init__(checkpointing.directory, fingerprint(), checkpointing.every)
