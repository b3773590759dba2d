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
import hashlib
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fippure.checkpoints import claim_run_directory
from fippure.config_checks import AT_LEAST_ONE, check_config
from fippure.errors import CheckpointError


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
    method: str, config: Any, variables: Any, images: Any, labels: Any, key: jax.Array
) -> dict[str, Any]:
    """What identifies a defense run: its name, config, key, clean set and starting variables
    (the arrays as SHA-1 digests). :func:`fippure.checkpoints.claim_run_directory` writes it as
    JSON."""
    return {
        "method": method,
        "config": dataclasses.asdict(config),
        "key": jax.random.key_data(key),
        "clean_set": _digest([images, labels]),
        "variables": _digest(jax.tree_util.tree_leaves(variables)),
    }


def _digest(arrays) -> str:
    digest = hashlib.sha1()
    for array in arrays:
        array = np.asarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class ProgressStore:
    """The progress directory of one run: :meth:`restore` once, then :meth:`save`, then
    :meth:`close`. ``fingerprint`` is called once, to stamp or check the directory."""

    def __init__(self, checkpointing: Checkpointing, fingerprint: Callable[[], Mapping[str, Any]]):
        self.directory = pathlib.Path(checkpointing.directory).resolve()
        self.every = checkpointing.every
        claim_run_directory(self.directory, fingerprint())
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False
            ),
        )

    def restore(self, carry: Any) -> tuple[int, Any, list[dict[str, float]]]:
        """``(steps done, carry, loss log)`` of the last save, or ``(0, carry, [])``.

        ``carry`` is the run's initial carry: its structure, shapes and dtypes are the template.
        Leaves that are Python scalars (host-side counters) come back as Python scalars.
        """
        step = self._manager.latest_step()
        if step is None:
            return 0, carry, []
        leaves, treedef = jax.tree_util.tree_flatten(carry)
        template = {_name(i): jnp.asarray(leaf) for i, leaf in enumerate(leaves)}
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    carry=ocp.args.StandardRestore(template), log=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # orbax raises several types for a mismatching tree
            raise CheckpointError(
                f"cannot resume from {self.directory} (step {step}): "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from None
        values = [
            type(leaf)(restored.carry[_name(i)].item())
            if isinstance(leaf, int | float | bool)
            else restored.carry[_name(i)]
            for i, leaf in enumerate(leaves)
        ]
        return int(step), jax.tree_util.tree_unflatten(treedef, values), list(restored.log)

    def save(self, step: int, carry: Any, log: list[dict[str, float]]) -> None:
        leaves = jax.tree_util.tree_leaves(carry)
        state = {_name(i): jnp.asarray(leaf) for i, leaf in enumerate(leaves)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                carry=ocp.args.StandardSave(state), log=ocp.args.JsonSave(list(log))
            ),
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _name(index: int) -> str:
    return f"leaf_{index:05d}"
