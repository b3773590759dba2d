"""The bookkeeping a training loop keeps beside its orbax checkpoints: ``history.json``.

The file holds the per-epoch history and, for each of the last two saves, a record of what the
checkpoint alone does not hold (the elapsed time, the unfinished epoch's step metrics, the
last evaluation)::

    {"history": [{"epoch": 1, "loss": ...}, ...],
     "saves": [{"step": 14, "elapsed_s": ..., ...}, {"step": 21, ...}]}

Orbax finishes a save in the background and begins one only after the one before has
finished. A run killed just after a save therefore resumes from the save before it, while the
file already describes the later one; the resumed run takes the record of the step it restored
and the history up to that step (:func:`resume_from`), so it reports what an uninterrupted run
reports.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import Array

from fippure.checkpoints import placed_like, write_json_atomically

#: Saves whose records the file keeps, and checkpoints the manager keeps: the latest, and the
#: finished one before it.
KEPT_SAVES = 2

FILE_NAME = "history.json"


def empty_progress() -> dict[str, Any]:
    """The progress of a run that has saved nothing."""
    return {"history": [], "saves": []}


def read_progress(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The history file of ``workdir`` (``{"history": [], "saves": []}`` where there is none).

    A file written before per-save records (one record of the last save, or only the history
    list) is read as a record without a step, which :func:`resume_from` takes for a run that
    restored a checkpoint when no record matches its step.
    """
    path = pathlib.Path(workdir) / FILE_NAME
    if not path.exists():
        return empty_progress()
    saved = json.loads(path.read_text())
    if isinstance(saved, list):
        saved = {"history": saved}
    if "saves" not in saved:
        record = {k: saved[k] for k in ("elapsed_s", "epoch_so_far", "final") if k in saved}
        saved = {"history": saved.get("history", []), "saves": [{"step": None, **record}]}
    return saved


def resume_from(
    saved: Mapping[str, Any], step: int, steps_per_epoch: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """What a run that restored the checkpoint of ``step`` (0: none) continues from.

    Returns:
        ``(history, record, saves)``: the epochs finished by ``step``, the record saved with
        that checkpoint (``{}`` for a run that starts afresh, or when none was kept), and the
        records to keep for the next save (those of ``step`` and before).
    """
    history = [h for h in saved["history"] if h["epoch"] * steps_per_epoch <= step]
    saves = [r for r in saved["saves"] if r["step"] is not None and r["step"] <= step]
    record = next((r for r in saves if r["step"] == step), None)
    if record is None:
        legacy = [r for r in saved["saves"] if r["step"] is None]
        record = legacy[0] if legacy and step else {}
    return history, dict(record), saves


def write_progress(
    workdir: str | pathlib.Path,
    history: Sequence[Mapping[str, Any]],
    saves: Sequence[Mapping[str, Any]],
    step: int,
    **record: Any,
) -> list[dict[str, Any]]:
    """Writes the history and the record of the save at ``step``, keeping the record of the
    save before it; returns the records written (pass them to the next call)."""
    kept = [dict(r) for r in saves if r["step"] < step][-(KEPT_SAVES - 1) :]
    written = [*kept, {"step": step, **record}]
    write_json_atomically(
        pathlib.Path(workdir) / FILE_NAME, {"history": list(history), "saves": written}
    )
    return written


def checkpoint_manager(workdir: str | pathlib.Path) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints``, keeping the last :data:`KEPT_SAVES` steps."""
    return ocp.CheckpointManager(
        pathlib.Path(workdir).resolve() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=KEPT_SAVES, create=True),
    )


def restore_latest(manager: ocp.CheckpointManager, tree: Any) -> tuple[Any, int]:
    """``(tree restored from the last finished checkpoint, its step)``, or ``(tree, 0)``; each
    array placed as its leaf in ``tree`` is (:func:`fippure.checkpoints.placed_like`)."""
    step = manager.latest_step()
    if step is None:
        return tree, 0
    return placed_like(tree, manager.restore(step, args=ocp.args.StandardRestore(tree))), int(step)


def save_progress(
    manager: ocp.CheckpointManager,
    workdir: str | pathlib.Path,
    step: int,
    tree: Any,
    history: Sequence[Mapping[str, Any]],
    saves: Sequence[Mapping[str, Any]],
    **record: Any,
) -> list[dict[str, Any]]:
    """Begins orbax's save of ``tree`` at ``step`` and writes its record
    (:func:`write_progress`); returns the records written."""
    manager.save(step, args=ocp.args.StandardSave(tree))
    return write_progress(workdir, history, saves, step, **record)


def epoch_metrics_to_save(
    epoch_metrics: list[dict[str, Array]], done: int
) -> dict[str, Any] | None:
    """The per-step metrics of the unfinished epoch as JSON (one fetch, at a save), so that a
    run resumed mid-epoch reports that epoch as an uninterrupted run does."""
    if not epoch_metrics:
        return None
    values = jax.device_get(epoch_metrics)
    columns = {k: [float(entry[k]) for entry in values] for k in values[0]}
    return {"first_step": done - len(values), **columns}


def restore_epoch_metrics(
    saved: Mapping[str, Any] | None, step: int, steps_per_epoch: int
) -> list[dict[str, Array]]:
    """The device metrics of the steps of ``step``'s epoch before ``step``, from what
    :func:`epoch_metrics_to_save` saved (at ``step`` or later in the same epoch: the run is
    deterministic); empty where they were not saved."""
    done_in_epoch = step % steps_per_epoch
    if not done_in_epoch or not saved or saved.get("first_step") != step - done_in_epoch:
        return []
    columns = {k: v for k, v in saved.items() if k != "first_step"}
    if any(len(v) < done_in_epoch for v in columns.values()):
        return []
    arrays = {k: jnp.asarray(np.asarray(v[:done_in_epoch], np.float32)) for k, v in columns.items()}
    return [{k: a[i] for k, a in arrays.items()} for i in range(done_in_epoch)]
