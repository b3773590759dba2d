"""Progress of a long attack fit (ISSBA's encoder, LF's pattern, CLB's PGD), so that a killed
fit resumes where it stopped.

A fit's loop carries a few arrays (parameters and Adam state, or the adversarial images done so
far) and draws step ``i``'s randomness as ``fold_in(key, i)``. Saving the carry every few steps
therefore lets a later call with the same inputs continue from the last save and end with what
an uninterrupted fit returns. The directory (``workdir`` of the fits) holds::

    run.json     the fit's fingerprint: attack, options, key, training set, poisoning plan,
                 initial state and reference model (arrays as SHA-1 digests); see
                 :func:`fippure.checkpoints.claim_run_directory`
    <step>/      orbax: the carry after ``step`` steps (the latest save only)

Progress of another fit is refused with a one-line :class:`fippure.errors.CheckpointError`
rather than mixed in. The layout and stamp are those of a defense's progress
(:mod:`fippure.purify.resume`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from fippure.checkpoints import ProgressDirectory, array_digest
from fippure.errors import CheckpointError, InvalidInputError

if TYPE_CHECKING:
    from fippure.attacks.base import Attack, AttackContext, State


def fit_fingerprint(attack: Attack, state: State, context: AttackContext) -> dict[str, Any]:
    """What identifies a fit: everything its result depends on."""
    plan, reference = context.plan, context.reference
    if reference is not None:
        reference = array_digest(jax.tree_util.tree_leaves(reference[1]))
    key = context.key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return {
        "attack": attack.name,
        "attack_options": attack.options(),
        "key": np.asarray(key).tolist(),
        "dataset": context.spec.name,
        "train_size": len(context.train),
        "train_set": array_digest([context.train.images, context.train.labels]),
        "poison_plan": {
            "target": int(plan.target),
            "mode": plan.mode,
            "rows": array_digest([plan.indices, plan.labels]),
        },
        "initial_state": array_digest(jax.tree_util.tree_leaves(state)),
        "reference": reference,
    }


class FitProgress:
    """The progress directory of one fit: :meth:`restore` once, :meth:`save`, :meth:`close`
    (a :class:`fippure.checkpoints.ProgressDirectory` whose saves must be finite)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], every: int):
        self._directory = ProgressDirectory(directory, fingerprint, every)
        self.directory, self.every = self._directory.directory, every

    def restore(self, carry: Any) -> tuple[int, Any]:
        """``(steps done, carry)`` of the last save, or ``(0, carry)``; ``carry`` is the
        template (structure, shapes, dtypes)."""
        try:
            step, carry, _ = self._directory.restore(carry)
        except CheckpointError:
            self.close()
            raise
        return step, carry

    def due(self, done: int, stop: int) -> bool:
        """Whether to save after ``done`` steps of a loop that stops at ``stop``."""
        return self._directory.due(done, stop)

    def save(self, step: int, carry: Any, what: str) -> None:
        """Saves ``carry`` as step ``step``; refuses non-finite floats (a resume would return
        to them). ``what`` names the fit in that error."""
        leaves = jax.device_get(jax.tree_util.tree_leaves(carry))
        if not all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.inexact)):
            raise InvalidInputError(
                f"{what} became non-finite by step {step}; lower its learning rate"
            )
        self._directory.save(step, carry)

    def close(self) -> None:
        self._directory.close()


def open_progress(
    attack: Attack,
    state: State,
    context: AttackContext,
    workdir: str | os.PathLike | None,
    every: int | None,
) -> FitProgress | None:
    """The fit's progress directory ``workdir`` (claimed now), or ``None`` without one.

    ``every``: the save interval in steps; ``None``: ``attack.fit_checkpoint_every``.
    """
    if workdir is None:
        return None
    every = attack.fit_checkpoint_every if every is None else every
    return FitProgress(workdir, fit_fingerprint(attack, state, context), every)
