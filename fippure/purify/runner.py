"""Running a defense on a checkpoint and judging it on the test split (after the fact).

The defense itself only receives the model, its variables and the clean set. The test split is
used here, after the defense has returned, to report ACC, ASR, RA and DER (SPEC section 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from fippure.checkpoints import (
    METADATA,
    RUN_STAMP,
    claim_run_directory,
    read_stamp,
    save_checkpoint,
    write_json_atomically,
)
from fippure.config_checks import check_count, check_seed
from fippure.errors import CheckpointError, InvalidInputError
from fippure.evaluation.metrics import (
    accuracy,
    defense_effectiveness_rating,
    evaluate_backdoor,
)
from fippure.inference import predict
from fippure.provenance import provenance
from fippure.purify.clean_stop import CleanStopConfig, purify_with_clean_stop
from fippure.purify.common import config_dict, validate_clean_set
from fippure.purify.registry import get_defense, make_config
from fippure.purify.resume import Checkpointing
from fippure.zoo import BackdooredModel, load_backdoored

#: ``out``'s subdirectory where a defense's progress is saved while it runs.
PROGRESS = "progress"
#: The observed test metrics of a run in progress (so a resumed run's trajectory is whole).
TRAJECTORY = "trajectory.json"


class EvaluationImages(NamedTuple):
    """The images :func:`evaluate` predicts: the test split's and the triggered set's."""

    test: np.ndarray | jax.Array
    triggered: np.ndarray | jax.Array | None


def upload_test_images(backdoored: BackdooredModel) -> EvaluationImages:
    """``backdoored``'s test and triggered images as device arrays, uploaded once for the
    repeated evaluations of a charted run (CIFAR-10's are about 141 MB, most of it the
    float32 triggered set)."""
    triggered = backdoored.triggered
    return EvaluationImages(
        jax.device_put(backdoored.test.images),
        None if triggered is None else jax.device_put(triggered.images),
    )


def evaluate(
    backdoored: BackdooredModel, variables, images: EvaluationImages | None = None
) -> dict[str, float | None]:
    """ACC (and ASR, RA if the model carries an attack) on the test split.

    Args:
        backdoored: the loaded model, its test split and triggered test set.
        variables: the variables to judge (``backdoored.variables`` or a defense's result).
        images: the test and triggered images already on the device
            (:func:`upload_test_images`), for a run that evaluates many times; by default
            each call uploads ``backdoored``'s NumPy images.

    Returns:
        ``{"acc", "asr", "ra"}`` as fractions; ASR and RA are ``None`` for a clean model.
    """
    if backdoored.triggered is None:
        test_images = backdoored.test.images if images is None else images.test
        predictions = predict(backdoored.model, variables, test_images, backdoored.spec)
        return {"acc": accuracy(predictions, backdoored.test.labels), "asr": None, "ra": None}
    return evaluate_backdoor(
        backdoored.model,
        variables,
        backdoored.test,
        backdoored.triggered,
        test_images=None if images is None else images.test,
        triggered_images=None if images is None else images.triggered,
    ).as_dict()


def _saved_steps(progress_dir: pathlib.Path) -> list[int]:
    """The steps whose progress ``progress_dir`` holds (orbax's step directories)."""
    if not progress_dir.is_dir():
        return []
    return [int(entry.name) for entry in progress_dir.iterdir() if entry.name.isdigit()]


def _finished_progress(progress_dir: pathlib.Path, steps: int, out) -> bool:
    """Whether ``progress_dir`` holds the last step of a run whose ``report.json`` was
    written: the leftovers of its clean-up, not progress to resume from."""
    saved = _saved_steps(progress_dir)
    return bool(saved) and max(saved) >= steps and (pathlib.Path(out) / "report.json").exists()


def run_defense(
    checkpoint: str | os.PathLike | BackdooredModel,
    defense: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    clean_size: int | float | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    replace: bool = False,
    data_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    progress: bool = True,
    before: Mapping[str, float] | None = None,
    observe_every: int = 0,
    checkpoint_every: int = 50,
    clean_stop: CleanStopConfig | None = None,
) -> dict[str, Any]:
    """Purifies a checkpoint with ``defense`` and evaluates before and after.

    Args:
        checkpoint: a checkpoint path or an already loaded :class:`BackdooredModel`.
        defense: registry name.
        overrides: config values (strings are parsed and validated).
        clean_size: use a smaller clean set drawn from the stored one (with a checkpoint
            path only; a loaded model keeps the clean set it was loaded with).
        seed: seed of the defense's randomness.
        out: if given, the purified checkpoint and ``report.json`` are written there. A
            directory that holds another checkpoint (the source itself, say) or another run's
            output is refused (unless ``replace``); the same run may be repeated into it.
        replace: remove another defense run's output found in ``out`` (never a checkpoint
            that no defense run wrote).
        data_dir: TFDS data directory.
        dtype: run the defense and the evaluations with the model computing in this dtype
            (``"bfloat16"``, say; with a checkpoint path only). The weights stay float32.
        progress: show a progress bar.
        before: metrics of the undefended model, if already known (saves an evaluation).
        observe_every: if positive, also evaluate on the test split every this many steps and
            return the curve as ``trajectory`` (its last point is the final evaluation). This
            is for benchmarks that chart a run; the defense never sees these numbers (its
            observer's return value is discarded), and its reported wall time excludes them.
        checkpoint_every: with ``out``, the defense saves its progress in ``out/progress``
            every this many steps, and a killed run given the same arguments resumes from
            there (:mod:`fippure.purify.resume`) with the same result. The directory is
            removed once the purified checkpoint and report are written.
        clean_stop: choose the defense's step count on the clean set
            (:func:`fippure.purify.clean_stop.purify_with_clean_stop`); the config's ``steps``
            is then replaced. Its runs are short searches and do not save progress. With
            ``observe_every``, the test metrics are charted at the search's checks instead.

    Returns:
        The report: ``before``/``after`` metrics, ``der``, the defense's report, the clean
        set's indices in the training split (``clean_indices``), provenance.
    """
    spec = get_defense(defense)
    config = make_config(defense, overrides)
    check_seed(seed)
    # before the output directory is claimed and the undefended model evaluated
    check_count(observe_every, "observe_every", 0)
    check_count(checkpoint_every, "checkpoint_every", 1)
    if isinstance(checkpoint, BackdooredModel):
        for given, value in (("clean_size", clean_size), ("data_dir", data_dir), ("dtype", dtype)):
            if value is not None:
                raise InvalidInputError(
                    f"{given} applies when a checkpoint is loaded, but run_defense got a loaded "
                    f"model; pass its path, or load it with load_backdoored(path, {given}=...)"
                )
    backdoored = (
        checkpoint
        if isinstance(checkpoint, BackdooredModel)
        else load_backdoored(checkpoint, data_dir=data_dir, clean_size=clean_size, dtype=dtype)
    )
    model_dtype = getattr(backdoored.model, "dtype", None)
    # before the output directory is claimed and the model evaluated: a checkpoint whose
    # model does not fit its dataset's images gets one line, not Flax's shape error
    validate_clean_set(
        backdoored.clean, backdoored.model, backdoored.variables, train=False
    )  # the defense checks its own mode
    if out is not None:
        claim_output_directory(
            out,
            {
                "source": str(backdoored.checkpoint.path),
                "defense": defense,
                "config": config_dict(config),
                "seed": seed,
                "clean_indices": backdoored.clean_indices,
                # only when set, so that the stamps of runs made before the options still match
                **({"clean_stop": dataclasses.asdict(clean_stop)} if clean_stop else {}),
                **({"dtype": model_dtype} if model_dtype is not None else {}),
            },
            replace=replace,
        )
    # a charted run evaluates many times: its test images go to the device once, and stay
    # there while the defense runs
    images = upload_test_images(backdoored) if observe_every > 0 else None
    before = (
        dict(before) if before is not None else evaluate(backdoored, backdoored.variables, images)
    )
    saves_progress = out is not None and clean_stop is None
    progress_dir = pathlib.Path(out).resolve() / PROGRESS if saves_progress else None
    saved_trajectory = progress_dir / TRAJECTORY if progress_dir is not None else None
    trajectory: list[dict[str, Any]] = []
    if progress_dir is not None and _finished_progress(progress_dir, config.steps, out):
        # left by a kill while a finished run deleted it (report.json is written after the
        # checkpoint, then progress/ is deleted): a half-deleted orbax step cannot be restored,
        # so the run is made again from the start. A rerun's own progress (killed before its
        # last step) is kept and resumed.
        shutil.rmtree(progress_dir, ignore_errors=True)
    if observe_every > 0 and saved_trajectory is not None and saved_trajectory.exists():
        try:
            saved = json.loads(saved_trajectory.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{saved_trajectory} is damaged (a run killed while an older fippure wrote "
                f"it); delete {progress_dir} to run again from the start"
            ) from None
        # the points of a killed run, where it observed at the same interval (a run resumed
        # with another observe_every starts its trajectory afresh, not as a mix of intervals)
        if isinstance(saved, dict) and saved.get("observe_every") == observe_every:
            trajectory = saved["points"]

    def observer(step: int, variables) -> None:
        # a resumed run observes again the steps after its last save
        trajectory[:] = [point for point in trajectory if point["step"] < step]
        trajectory.append({"step": step, **evaluate(backdoored, variables, images)})
        if saved_trajectory is not None:
            # atomically: a kill mid-write leaves the old points or the new ones
            write_json_atomically(
                saved_trajectory, {"observe_every": observe_every, "points": trajectory}
            )

    if clean_stop is not None:
        variables, report = purify_with_clean_stop(
            spec,
            backdoored.model,
            backdoored.variables,
            backdoored.clean,
            config,
            jax.random.key(seed),
            clean_stop,
            progress=progress,
            observer=observer if observe_every > 0 else None,
        )
    else:
        variables, report = spec.purify(
            backdoored.model,
            backdoored.variables,
            backdoored.clean,
            config,
            jax.random.key(seed),
            progress=progress,
            observer=observer if observe_every > 0 else None,
            observe_every=observe_every,
            checkpointing=(
                Checkpointing(progress_dir, every=checkpoint_every) if progress_dir else None
            ),
        )
    after = evaluate(backdoored, variables, images)
    if observe_every > 0 and clean_stop is None:  # the final point is the evaluation just made
        trajectory.append({"step": report.steps, **after})
    der = None
    if before.get("asr") is not None:
        der = defense_effectiveness_rating(
            acc_before=before["acc"],
            asr_before=before["asr"],
            acc_after=after["acc"],
            asr_after=after["asr"],
        )
    meta = backdoored.checkpoint.metadata
    result = {
        "checkpoint": str(backdoored.checkpoint.path),
        "attack": (meta.get("attack") or {}).get("name"),
        "defense": defense,
        "seed": seed,
        "clean_examples": len(backdoored.clean),
        "model_dtype": model_dtype,
        "clean_indices": [int(i) for i in backdoored.clean_indices],
        "before": before,
        "after": after,
        "der": der,
        "report": report.to_dict(),
        **({"trajectory": trajectory} if trajectory else {}),
        **provenance(),
    }
    if out is not None:
        out = pathlib.Path(out).resolve()
        keep = ("model", "dataset", "image_shape", "normalization", "attack", "clean_seed")
        metadata = {k: meta[k] for k in keep if k in meta}
        metadata["clean_indices"] = backdoored.clean_indices
        metadata["defense"] = {
            "name": defense,
            "config": report.config,
            "seed": seed,
            "source": str(backdoored.checkpoint.path),
            "model_dtype": model_dtype,
            **({"clean_stop": dataclasses.asdict(clean_stop)} if clean_stop else {}),
        }
        extras = {"attack_state": backdoored.attack_state, **report.artifacts}
        save_checkpoint(out, variables, metadata, extras=extras, model=backdoored.model)
        (out / "report.json").write_text(json.dumps(result, indent=1))
        if progress_dir is not None:
            shutil.rmtree(progress_dir, ignore_errors=True)
    return result


def claim_output_directory(
    out: str | os.PathLike, fingerprint: Mapping[str, Any], *, replace: bool = False
) -> None:
    """Stamps ``out`` as this defense run's output directory, or checks the stamp there.

    Args:
        out: the output directory.
        fingerprint: what identifies the run (JSON-able).
        replace: remove another defense run's output (a stamped directory) instead of refusing.

    Raises:
        CheckpointError: ``out`` lies inside the source checkpoint, holds a checkpoint that no
            defense run stamped (the source checkpoint, a trained model) or, without
            ``replace``, the output of another run (another defense, config, seed, source or
            clean set), which writing there would destroy. A run that stopped before it saved
            any progress holds nothing, and another run may take its directory.
    """
    out = pathlib.Path(out).resolve()
    source = fingerprint.get("source")
    if source is not None and out != pathlib.Path(source).resolve():
        if out.is_relative_to(pathlib.Path(source).resolve()):
            raise CheckpointError(
                f"--out {out} lies inside the source checkpoint {source}; writing there would "
                "mix the purified model into it. Use another --out directory"
            )
    progress, stamp = out / PROGRESS, out / RUN_STAMP
    previous = read_stamp(stamp) if stamp.exists() else None
    ours = previous is not None and "defense" in previous
    if (out / METADATA).exists() and not ours:
        raise CheckpointError(
            f"{out} already holds a checkpoint that is not a defense's output (the source "
            "checkpoint or a trained model); use another --out directory"
        )
    saved = bool(_saved_steps(progress))
    if ours and not (out / METADATA).exists() and not saved:
        # a run that stopped before saving anything (a bad option, say) left nothing to keep
        shutil.rmtree(progress, ignore_errors=True)
        stamp.unlink()
    try:
        claim_run_directory(out, fingerprint)
    except CheckpointError:
        if not (replace and ours):  # never remove what another command wrote
            raise
        shutil.rmtree(out)
        claim_run_directory(out, fingerprint)
