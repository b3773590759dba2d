"""Model checkpoints: variables (and optional extra pytrees) in orbax, metadata in JSON.

A checkpoint is a directory::

    metadata.json      model name and kwargs, dataset, normalisation, attack spec,
                       clean-set indices, git revision, ...
    variables/         orbax StandardCheckpointer: {'params', 'batch_stats'}
    extras/<name>/     orbax StandardCheckpointer: e.g. an attack's state pytree

Loading rebuilds the model from the metadata and checks every array's shape against it, so a
checkpoint loaded into the wrong model fails with a message naming the mismatching paths.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fippure import __version__
from fippure.config_checks import is_integer
from fippure.errors import CheckpointError, InvalidInputError, UnknownNameError
from fippure.models.registry import MODELS, create_model, init_variables
from fippure.provenance import code_revision

METADATA = "metadata.json"
#: What orbax writes beside the arrays of a checkpoint directory.
_ORBAX_METADATA_FILES = frozenset({"_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"})
FORMAT_VERSION = 1


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the Flax module rebuilt from the metadata.
        variables: ``{'params': ..., 'batch_stats': ...}``.
        metadata: the JSON metadata (see :func:`save_checkpoint`).
        extras: the extra pytrees saved with it, by name.
        path: where it was loaded from.
    """

    model: nn.Module
    variables: dict[str, Any]
    metadata: dict[str, Any]
    extras: dict[str, Any]
    path: pathlib.Path


def model_metadata(name: str, num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """The ``model`` entry of the metadata: enough to rebuild the module."""
    return {"name": name, "num_classes": int(num_classes), "kwargs": kwargs}


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    metadata: Mapping[str, Any],
    *,
    extras: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    model: nn.Module | None = None,
) -> pathlib.Path:
    """Writes a checkpoint directory.

    Args:
        path: the directory (made absolute; orbax needs absolute paths).
        variables: the model variables; only ``params`` and ``batch_stats`` are kept.
        metadata: JSON-able facts; must contain ``model`` (see :func:`model_metadata`). The
            fippure version, git revision and date are added.
        extras: further pytrees to store (an attack's state, masks, shifts...); empty ones
            are skipped.
        overwrite: replace an existing checkpoint at ``path`` (other files in the directory,
            such as reports or training state, are left alone).
        model: the module the variables belong to; by default it is rebuilt from the
            metadata's ``model`` entry when that names a registered model.

    Raises:
        CheckpointError: the metadata has no model name, the checkpoint exists and
            ``overwrite`` is false, or the variables do not fit the model (checked on shapes
            before anything is written, where the image shape is known from ``image_shape``
            or a catalogued ``dataset`` in the metadata), so that a checkpoint written can
            be loaded.

    Returns:
        The absolute path.
    """
    path = pathlib.Path(path).resolve()
    if "model" not in metadata or "name" not in metadata["model"]:
        raise CheckpointError("checkpoint metadata needs a 'model' entry with its 'name'")
    if (path / METADATA).exists() and not overwrite:
        raise CheckpointError(f"{path} already holds a checkpoint")
    kept = _saved_collections(variables)
    _check_variables_to_save(path, kept, metadata, model)
    for part in (METADATA, "variables", "extras"):
        target = path / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    extras = {k: v for k, v in (extras or {}).items() if jax.tree_util.tree_leaves(v)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "variables", jax.device_get(kept))
        for name, tree in extras.items():
            checkpointer.save(path / "extras" / name, jax.device_get(tree))
        checkpointer.wait_until_finished()
    # the keys this writer knows best come last: metadata copied from a loaded checkpoint
    # would otherwise keep its creation date and revision, and list extras not written here
    full = {
        **_to_jsonable(dict(metadata)),
        "format_version": FORMAT_VERSION,
        "fippure_version": __version__,
        "git_revision": code_revision(),
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "extras": sorted(extras),
    }
    (path / METADATA).write_text(json.dumps(full, indent=1))
    return path


#: The fingerprint file of a run's working directory (see :func:`claim_run_directory`).
RUN_STAMP = "run.json"


#: Settings that decide only what a run reports and when it saves, never its weights: a run
#: may be resumed with other values (e.g. ``--eval-every 1`` to watch a killed run).
BOOKKEEPING_KEYS = frozenset({"eval_every", "checkpoint_every", "log_every"})


def shaping_part(fingerprint: Any) -> Any:
    """``fingerprint`` without its :data:`BOOKKEEPING_KEYS` (at any depth): what must match
    for a run directory to be resumed."""
    if isinstance(fingerprint, Mapping):
        return {k: shaping_part(v) for k, v in fingerprint.items() if k not in BOOKKEEPING_KEYS}
    if isinstance(fingerprint, list):
        return [shaping_part(v) for v in fingerprint]
    return fingerprint


def stamp_differences(previous: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> list[str]:
    """The top-level entries of two run fingerprints that differ in a setting that shapes the
    run (empty: the same run)."""
    previous, fingerprint = shaping_part(previous), shaping_part(fingerprint)
    return sorted(
        k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k)
    )


def write_json_atomically(path: pathlib.Path, value: Any) -> None:
    """Writes ``value`` as JSON to a temporary file beside ``path``, then renames it into place,
    so that a run killed mid-write leaves the old file or the new one, never a truncated one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def read_stamp(stamp: pathlib.Path) -> dict[str, Any] | None:
    """A run stamp's fingerprint, or ``None`` when the file is empty or not a JSON object (a
    run killed while an older fippure wrote it non-atomically)."""
    try:
        value = json.loads(pathlib.Path(stamp).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def claim_run_directory(directory: str | os.PathLike, fingerprint: Mapping[str, Any]) -> bool:
    """Makes ``directory`` a run's working directory: stamps it with the run's ``fingerprint``
    (JSON), or checks that the stamp already there is the same run.

    Returns:
        Whether the directory already held this run (so it may be resumed).

    Raises:
        CheckpointError: the directory holds another run (its stamp and anything it saved);
            the message names what differs. A stamp with nothing beside it is replaced. A
            checkpoint without a stamp (the zoo's, an older fippure's) is refused too.
            Settings in :data:`BOOKKEEPING_KEYS` may differ; the first stamp is kept.
    """
    directory = pathlib.Path(directory).resolve()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a directory; choose another one")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {directory}: {error.strerror}") from None
    stamp = directory / RUN_STAMP
    fingerprint = json.loads(json.dumps(_to_jsonable(dict(fingerprint))))  # as JSON reads it
    if not stamp.exists():
        if (directory / METADATA).exists():
            raise CheckpointError(
                f"{directory} already holds a checkpoint of an unknown run; use another --out "
                "directory"
            )
        write_json_atomically(stamp, fingerprint)
        return False
    alone = all(entry == stamp for entry in directory.iterdir())
    previous = read_stamp(stamp)
    if previous is None and not alone:
        raise CheckpointError(
            f"{stamp} is unreadable (a run killed while writing it?) and {directory} holds "
            "more; delete the directory or use another --out directory"
        )
    changed = ["the whole stamp"] if previous is None else stamp_differences(previous, fingerprint)
    if changed and alone:
        # the other run stopped before it saved anything (a bad option, missing data, a kill
        # while its stamp was written)
        write_json_atomically(stamp, fingerprint)
        return False
    if changed:
        raise CheckpointError(
            f"{directory} holds a run with a different {', '.join(changed)}; "
            "use another --out directory or delete it"
        )
    return True


def array_digest(arrays: Any) -> str:
    """SHA-1 of a sequence of arrays (dtype, shape and bytes), for run fingerprints."""
    digest = hashlib.sha1()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


class ProgressDirectory:
    """The progress directory of one resumable loop (a defense's steps, an attack's fit):
    :meth:`restore` once, then :meth:`save`, then :meth:`close`.

    It holds ``run.json``, the run's fingerprint (stamped or checked here by
    :func:`claim_run_directory`, so progress of another run is refused), and the latest orbax
    save of the loop's carry and log (written synchronously, one kept).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError(f"the save interval must be a positive integer, got {every!r}")
        self.directory = pathlib.Path(directory).resolve()
        self.every = every
        claim_run_directory(self.directory, fingerprint)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False
            ),
        )

    def restore(self, carry: Any) -> tuple[int, Any, list[Any]]:
        """``(steps done, carry, log)`` of the last save, or ``(0, carry, [])``.

        ``carry`` is the loop's initial carry: its structure, shapes and dtypes are the
        template. Leaves come back as what they were: Python scalars (host-side counters) as
        Python scalars, NumPy arrays as NumPy arrays, the rest as JAX arrays.
        """
        step = self._manager.latest_step()
        if step is None:
            return 0, carry, []
        leaves, treedef = jax.tree_util.tree_flatten(carry)
        template = {_leaf_name(i): _host_or_device(leaf) for i, leaf in enumerate(leaves)}
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    carry=ocp.args.StandardRestore(template), log=ocp.args.JsonRestore()
                ),
            )
        except Exception as error:  # orbax raises several types for a mismatching tree
            raise CheckpointError(
                f"cannot resume from {self.directory} (step {step}): {_first_line(error)}"
            ) from None
        values = []
        for i, leaf in enumerate(leaves):
            value = restored.carry[_leaf_name(i)]
            if isinstance(leaf, int | float | bool):
                value = type(leaf)(value.item())
            elif isinstance(leaf, np.ndarray):
                value = np.array(value)
            values.append(value)
        values = placed_like(leaves, values)
        return int(step), jax.tree_util.tree_unflatten(treedef, values), list(restored.log)

    def due(self, done: int, stop: int) -> bool:
        """Whether to save after ``done`` steps of a loop that stops at ``stop``."""
        return done % self.every == 0 or done == stop

    def save(self, step: int, carry: Any, log: Sequence[Any] = ()) -> None:
        """Saves the carry (and the JSON-able log) as step ``step``."""
        leaves = jax.tree_util.tree_leaves(carry)
        state = {_leaf_name(i): _host_or_device(leaf) for i, leaf in enumerate(leaves)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                carry=ocp.args.StandardSave(state), log=ocp.args.JsonSave(list(log))
            ),
        )

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _leaf_name(index: int) -> str:
    return f"leaf_{index:05d}"


def _host_or_device(leaf: Any) -> Any:
    return leaf if isinstance(leaf, np.ndarray) else jnp.asarray(leaf)


def placed_like(template: Any, restored: Any) -> Any:
    """``restored`` (a tree orbax restored on ``template``) with each JAX array placed as its
    template leaf was.

    Orbax commits every array it restores to its template leaf's device. A carry mixes
    committed arrays (weights a user put on device 2, or replicated) with uncommitted ones
    (optax's counts, a fresh step counter: made on the default device, free to follow the
    arrays they meet); restored all committed, the two placements could not enter one jitted
    step. The leaves whose template was uncommitted come back uncommitted (through the host,
    once per resume).
    """

    def place(leaf, value):
        if isinstance(leaf, jax.Array) and not leaf.committed and isinstance(value, jax.Array):
            return jnp.asarray(np.asarray(value))
        return value

    return jax.tree_util.tree_map(place, template, restored)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the checkpoint at ``path``, with clear errors if it is not one."""
    path = pathlib.Path(path).resolve()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    meta_file = path / METADATA
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a fippure checkpoint (no {METADATA})")
    try:
        metadata = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"corrupt checkpoint {path}: {METADATA} is not JSON ({error})"
        ) from None
    model = metadata.get("model") if isinstance(metadata, dict) else None
    if not isinstance(model, dict) or not {"name", "num_classes"} <= set(model):
        raise CheckpointError(
            f"corrupt checkpoint {path}: {METADATA} has no 'model' entry with name and num_classes"
        )
    problem = _metadata_type_problem(metadata)
    if problem is not None:
        raise CheckpointError(f"corrupt checkpoint {path}: {METADATA} {problem}")
    return metadata


def _metadata_type_problem(metadata: dict[str, Any]) -> str | None:
    """What is of the wrong type among the metadata fields the loaders read (a hand-edited or
    truncated file), as the end of a sentence; ``None`` where all are right."""
    model = metadata["model"]
    attack = metadata.get("attack")
    normalization = metadata.get("normalization")
    checks = [
        (isinstance(model["name"], str), "model.name must be a string"),
        (is_integer(model["num_classes"]), "model.num_classes must be an integer"),
        (isinstance(model.get("kwargs", {}), dict), "model.kwargs must be a mapping"),
        (
            isinstance(metadata.get("extras", []), list)
            and all(isinstance(e, str) for e in metadata.get("extras", [])),
            "extras must be a list of names",
        ),
        (
            metadata.get("image_shape") is None
            or (
                isinstance(metadata["image_shape"], list)
                and len(metadata["image_shape"]) == 3
                and all(is_integer(v) for v in metadata["image_shape"])
            ),
            "image_shape must be a list of three integers",
        ),
        (
            normalization is None
            or (isinstance(normalization, dict) and {"mean", "std"} <= set(normalization)),
            "normalization must hold mean and std",
        ),
        (
            metadata.get("clean_seed") is None or is_integer(metadata["clean_seed"]),
            "clean_seed must be an integer",
        ),
        (attack is None or isinstance(attack, dict), "attack must be a mapping"),
        (
            not isinstance(attack, dict) or isinstance(attack.get("options", {}), dict),
            "attack.options must be a mapping",
        ),
    ]
    return next((message for ok, message in checks if not ok), None)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    image_shape: tuple[int, int, int] | None = None,
) -> Checkpoint:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint directory.
        model: the module to load into; by default it is rebuilt from the metadata. Passing a
            different architecture raises a :class:`CheckpointError` naming the mismatch.
        image_shape: input shape for building the abstract variables; by default the
            dataset's shape from the metadata.

    Raises:
        CheckpointError: missing, corrupt, for another model, or naming a model outside the
            registry when ``model`` is not given.
    """
    path = pathlib.Path(path).resolve()
    metadata = read_metadata(path)
    spec = metadata["model"]
    if model is None:
        if spec["name"] not in MODELS:
            raise CheckpointError(
                f"checkpoint {path} holds a {spec['name']!r}, which is not a registered model "
                f"({', '.join(sorted(MODELS))}); load it into its module with "
                "load_checkpoint(path, model=...)"
            )
        try:
            model = create_model(spec["name"], spec["num_classes"], **spec.get("kwargs", {}))
        except InvalidInputError as error:
            raise CheckpointError(
                f"corrupt checkpoint {path}: its metadata's model options are refused: {error}"
            ) from None
    if image_shape is None:
        image_shape = _metadata_image_shape(metadata)
    expected = _abstract_variables(model, image_shape)
    if not (path / "variables").is_dir():
        raise CheckpointError(f"corrupt checkpoint {path}: its variables/ directory is missing")
    stored_files = {item.name for item in (path / "variables").iterdir()}
    if "_METADATA" in stored_files and not stored_files - _ORBAX_METADATA_FILES:
        # checked here: orbax's failed read of a missing store leaves tensorstore callbacks
        # aimed at its closed event loop ("Event loop is closed" on stderr)
        raise CheckpointError(
            f"corrupt checkpoint {path}: variables/ holds metadata but no array data"
        )
    with ocp.StandardCheckpointer() as checkpointer:  # closing it stops its event loop cleanly
        try:
            stored = checkpointer.metadata(path / "variables").item_metadata
        except Exception as error:  # orbax raises several types for unreadable directories
            raise CheckpointError(
                f"corrupt checkpoint {path}: cannot read variables/ ({_first_line(error)})"
            ) from None
        if stored is None:  # orbax returns no tree metadata when it cannot parse the directory
            raise CheckpointError(
                f"corrupt checkpoint {path}: cannot read the metadata of variables/"
            )
        _check_shapes(path, expected, stored, spec["name"], type(model).__name__)
        for name in metadata.get("extras", []):
            # named here, not in orbax's error about a directory it cannot find
            if not (path / "extras" / name).is_dir():
                raise CheckpointError(
                    f"corrupt checkpoint {path}: its metadata lists extras/{name}, which is missing"
                )
        try:
            variables = checkpointer.restore(path / "variables", expected)
            extras = {
                name: checkpointer.restore(path / "extras" / name)
                for name in metadata.get("extras", [])
            }
        except Exception as error:
            raise CheckpointError(f"corrupt checkpoint {path}: {_first_line(error)}") from None
    return Checkpoint(model, dict(variables), metadata, extras, path)


def _first_line(error: Exception) -> str:
    """``Type: first line of the message``, so that fippure's errors stay one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _saved_collections(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The collections a checkpoint holds: ``params`` and ``batch_stats``, where not empty."""
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats") and v}


def _abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The saved collections of ``model`` on ``image_shape`` images, as shapes (nothing is
    computed)."""
    return _saved_collections(
        jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
    )


def _metadata_image_shape(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """The image shape the metadata gives, or its dataset's."""
    return tuple(metadata.get("image_shape") or _dataset_shape(metadata))


def _dataset_shape(metadata: Mapping[str, Any]) -> tuple[int, int, int]:
    from fippure.data.catalog import get_spec

    dataset = metadata.get("dataset")
    if not dataset:
        raise CheckpointError("checkpoint metadata names neither 'image_shape' nor 'dataset'")
    return get_spec(dataset).image_shape


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape) for keys, leaf in flat
    }


def _shape_mismatch(expected, stored, stored_word: str = "stored") -> str:
    """How ``stored``'s array shapes differ from ``expected``'s ("" when they agree)."""
    want, have = _shapes(expected), _shapes(dict(stored))
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape(s) differ, e.g. {k}: {have[k]} {stored_word} vs {want[k]}"
        )
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    return "; ".join(parts)


def _check_shapes(path, expected, stored, stored_name, model_class) -> None:
    mismatch = _shape_mismatch(expected, stored)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} (a {stored_name}) does not fit the {model_class} it is loaded "
            f"into: {mismatch}"
        )


def _check_variables_to_save(path, kept, metadata, model) -> None:
    """Refuses, before writing, variables that :func:`load_checkpoint` could not load into the
    model the metadata describes (or ``model``). A model name outside the registry without
    ``model``, or metadata without a known image shape, leaves nothing to check against: such
    a checkpoint is loaded with ``load_checkpoint(model=..., image_shape=...)``."""
    spec = metadata["model"]
    if model is None:
        if spec["name"] not in MODELS:
            return
        try:
            model = create_model(spec["name"], spec.get("num_classes"), **spec.get("kwargs", {}))
        except (InvalidInputError, UnknownNameError, TypeError) as error:
            raise CheckpointError(
                f"cannot write checkpoint {path}: its metadata's model entry does not build a "
                f"model ({error})"
            ) from None
    try:
        image_shape = _metadata_image_shape(metadata)
    except (CheckpointError, UnknownNameError):
        return
    mismatch = _shape_mismatch(_abstract_variables(model, image_shape), kept, stored_word="given")
    if mismatch:
        raise CheckpointError(
            f"cannot write checkpoint {path}: the variables do not fit the model its metadata "
            f"names, {spec['name']} (a {type(model).__name__} on {image_shape} images): {mismatch}"
        )
