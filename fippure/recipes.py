"""End-to-end recipes that tie data, models, training and checkpoints together.

``train_classifier`` is what ``fippure train`` runs: it draws the defender's clean set from the
training split (held out from training, SPEC section 1), trains on the rest, evaluates on the
test split, and writes a checkpoint plus a JSON report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from fippure.checkpoints import claim_run_directory, model_metadata, save_checkpoint
from fippure.config_checks import check_seed
from fippure.data.sources import ImageDataset, load_dataset
from fippure.data.splits import split_clean_set
from fippure.errors import InvalidInputError
from fippure.inference import accuracy
from fippure.models.registry import create_model, init_variables
from fippure.provenance import provenance
from fippure.training import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """The splits every run uses.

    Attributes:
        train: the training images the model is trained on (the clean set removed).
        clean: the defender's clean set D_v (from the training split).
        test: the test split.
        clean_indices: indices of ``clean`` in the full training split.
        train_indices: indices of ``train`` in the full training split.
    """

    train: ImageDataset
    clean: ImageDataset
    test: ImageDataset
    clean_indices: Any
    train_indices: Any


def prepare_data(
    dataset: str,
    *,
    clean_size: int | float = 0.01,
    clean_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    clean_disjoint: bool = True,
) -> PreparedData:
    """Loads ``dataset`` and draws the defender's clean set from its training split.

    ``clean_disjoint`` (SPEC section 1, **choice**: True, as in the seed code): the clean set
    is held out, and the model trains on the rest. False: the model trains on the whole split,
    the clean set's images included (the attacker may have poisoned its own copies of them;
    the defender's ``clean`` holds the clean originals).
    """
    _clean_split_stamp(clean_disjoint)  # a one-line error before any data is loaded
    full = load_dataset(dataset, "train", data_dir=data_dir, download=download)
    test = load_dataset(dataset, "test", data_dir=data_dir, download=download)
    split = split_clean_set(full.labels, clean_size, full.num_classes, seed=clean_seed)
    if clean_disjoint:
        train_indices, name = split.rest, "train-minus-clean"
    else:
        train_indices, name = np.arange(len(full.labels)), "train"
    return PreparedData(
        train=full.subset(train_indices, name),
        clean=full.subset(split.clean, "clean"),
        test=test,
        clean_indices=split.clean,
        train_indices=train_indices,
    )


def _clean_split_stamp(clean_disjoint: bool) -> dict[str, Any]:
    """What a run directory's stamp and a checkpoint's metadata record of the split: nothing
    for the default (so runs made before the option match), ``clean_disjoint: False`` else."""
    if not isinstance(clean_disjoint, bool):
        raise InvalidInputError(f"clean_disjoint must be True or False, got {clean_disjoint!r}")
    return {} if clean_disjoint else {"clean_disjoint": False}


def train_classifier(
    *,
    dataset: str,
    model: str,
    out: str | os.PathLike,
    config: TrainConfig,
    model_kwargs: dict[str, Any] | None = None,
    clean_size: int | float = 0.01,
    clean_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    clean_disjoint: bool = True,
) -> dict[str, Any]:
    """Trains a clean classifier, checkpoints it in ``out`` and returns the JSON report.

    ``out`` receives the final checkpoint (``metadata.json``, ``variables/``), ``report.json``,
    ``run.json`` (what the run is) and ``train/`` (orbax checkpoints of the run; re-running the
    same command resumes). A directory that holds another run is refused
    (:class:`~fippure.errors.CheckpointError`).

    Args:
        dataset: ``cifar10``, ``cifar100``, ``gtsrb`` or ``digits``.
        model: a registry name (:func:`fippure.models.create_model`).
        out: the run directory.
        config: the training configuration (epochs, batch size, schedule, seed...).
        model_kwargs: the model's options (``{"width": 16}``); ``None`` values are dropped.
        clean_size: the defender's clean set D_v, a count (int) or a fraction (float in
            (0, 1)) of the training split.
        clean_seed: seed of the class-balanced clean-set draw.
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR``).
        progress: show progress bars.
        clean_disjoint: see :func:`prepare_data`.
    """
    out = pathlib.Path(out).resolve()
    model_kwargs = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    data = prepare_data(
        dataset,
        clean_size=clean_size,
        clean_seed=clean_seed,
        data_dir=data_dir,
        clean_disjoint=clean_disjoint,
    )
    network = create_model(model, data.train.num_classes, **model_kwargs)
    claim_run_directory(
        out,
        {
            "command": "train",
            "dataset": dataset,
            "model": model,
            "model_kwargs": model_kwargs,
            "clean_size": clean_size,
            "clean_seed": clean_seed,
            **_clean_split_stamp(clean_disjoint),
            "train_config": dataclasses.asdict(config),
        },
    )
    variables = init_variables(network, jax.random.key(config.seed), data.train.spec.image_shape)
    spec = data.train.spec

    def evaluate(variables):
        return {
            "test_accuracy": accuracy(network, variables, data.test.images, data.test.labels, spec)
        }

    variables, report = train(
        network,
        data.train,
        config,
        variables=variables,
        workdir=out / "train",
        evaluate=evaluate,
        progress=progress,
    )
    metadata = {
        "model": model_metadata(model, data.train.num_classes, **model_kwargs),
        "dataset": dataset,
        "image_shape": list(spec.image_shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "attack": None,
        "clean_indices": data.clean_indices,
        "clean_seed": clean_seed,
        **_clean_split_stamp(clean_disjoint),
        "train_config": dataclasses.asdict(config),
    }
    save_checkpoint(out, variables, metadata)
    final = report.final or evaluate(variables)  # a finished run resumed has no last evaluation
    result = {
        "dataset": dataset,
        "model": model,
        "model_kwargs": model_kwargs,
        "test_accuracy": final.get("test_accuracy"),
        "epochs": config.epochs,
        "train_examples": len(data.train),
        "clean_examples": len(data.clean),
        "wall_time_s": report.total_wall_time_s,
        "train_images_per_s": report.train_images_per_s,
        "resumed_from_step": report.resumed_from_step,
        "history": report.history,
        "train_config": dataclasses.asdict(config),
        **provenance(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    return result


def train_backdoored(
    *,
    dataset: str,
    model: str,
    out: str | os.PathLike,
    config: TrainConfig,
    attack: str,
    attack_options: dict[str, Any] | None = None,
    target: int = 0,
    ratio: float = 0.1,
    mode: str = "all_to_one",
    attack_seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    clean_size: int | float = 0.01,
    clean_seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    progress: bool = True,
    clean_disjoint: bool = True,
) -> dict[str, Any]:
    """Trains a backdoored classifier (SPEC sections 1 and 7) and checkpoints it in ``out``.

    The checkpoint stores everything needed to re-create the triggered test set: the attack's
    name and options, its state pytree (``extras/attack_state``, as ``attack.saved_state``
    keeps it), seeds, the poisoned indices and the clean-set indices (both into the full
    training split). Like :func:`train_classifier`, it stamps ``out`` with what the run is
    (``run.json``) and refuses a directory that holds another run.

    Args:
        dataset, model, out, config, model_kwargs, clean_size, clean_seed, data_dir,
            progress: as for :func:`train_classifier`.
        attack: an attack name (:func:`fippure.attacks.make_attack`).
        attack_options: the attack's hyper-parameters (``{"alpha": 0.1}``).
        target: the target class (all-to-one).
        ratio: poisoned images / the attacker's training set (see
            :func:`fippure.attacks.make_poison_plan`).
        mode: ``all_to_one`` or ``all_to_all``.
        attack_seed: seed of the poisoned rows and of the trigger.
        reference: checkpoint of a clean model, for attacks that need one
            (``attack.needs_reference``: label-consistent PGD, LF).
        clean_disjoint: hold the clean set out of the attacker's training set (SPEC section
            1's choice); False trains (and poisons) on the whole split, the clean set's images
            included. See :func:`prepare_data`.

    Returns:
        The JSON report (also written to ``out/report.json``).
    """
    from fippure.attacks import (
        AttackContext,
        make_attack,
        make_poison_plan,
        triggered_test_set,
        validate_attack_args,
    )
    from fippure.checkpoints import load_checkpoint
    from fippure.errors import InvalidInputError
    from fippure.evaluation.metrics import evaluate_backdoor

    out = pathlib.Path(out).resolve()
    threat = make_attack(attack, **(attack_options or {}))
    model_kwargs = {k: v for k, v in (model_kwargs or {}).items() if v is not None}
    from fippure.data.catalog import get_spec

    spec = get_spec(dataset)
    validate_attack_args(
        ratio=ratio,
        target=target,
        mode=mode,
        num_classes=spec.num_classes,
        clean_label=threat.clean_label,
    )
    network = create_model(model, spec.num_classes, **model_kwargs)
    if threat.needs_reference and reference is None:
        raise InvalidInputError(f"attack {attack} needs a clean reference model (--reference)")
    if reference is not None and not threat.needs_reference:
        raise InvalidInputError(
            f"attack {attack} does not use a reference model; drop --reference (only "
            "attacks that fit their trigger to a clean model take one: clb, lf)"
        )
    if reference is not None and threat.needs_reference:
        _check_reference(reference, dataset, spec)
    threat.check_training(spec, config)  # before the directory is claimed
    check_seed(attack_seed, "attack_seed")
    check_seed(clean_seed, "clean_seed")
    # Everything that shapes the weights: resuming (or reusing attack_fit/) under another
    # attack, target or clean split would relabel a model trained for the old one.
    claim_run_directory(
        out,
        {
            "command": "attack",
            "dataset": dataset,
            "model": model,
            "model_kwargs": model_kwargs,
            "attack": attack,
            "attack_options": threat.options(),
            "target": target,
            "ratio": ratio,
            "mode": mode,
            "attack_seed": attack_seed,
            "clean_size": clean_size,
            "clean_seed": clean_seed,
            **_clean_split_stamp(clean_disjoint),
            "reference": str(pathlib.Path(reference).resolve()) if reference else None,
            "train_config": dataclasses.asdict(config),
        },
    )
    data = prepare_data(
        dataset,
        clean_size=clean_size,
        clean_seed=clean_seed,
        data_dir=data_dir,
        clean_disjoint=clean_disjoint,
    )
    plan = make_poison_plan(
        data.train.labels,
        ratio=ratio,
        num_classes=spec.num_classes,
        target=target,
        mode=mode,
        clean_label=threat.clean_label,
        seed=attack_seed,
    )
    attack_key = jax.random.key(attack_seed)
    ref = None
    if reference is not None and threat.needs_reference:
        loaded = load_checkpoint(reference)
        ref = (loaded.model, loaded.variables)
    context = AttackContext(
        train=data.train,
        plan=plan,
        spec=spec,
        key=jax.random.fold_in(attack_key, 1),
        reference=ref,
        progress=progress,
    )
    state = _fitted_attack_state(threat, context, jax.random.fold_in(attack_key, 0), out)
    variables = init_variables(network, jax.random.key(config.seed), spec.image_shape)

    def evaluate(variables, state):
        triggered = triggered_test_set(
            threat, state, data.test, target=target, mode=mode, seed=attack_seed
        )
        metrics = evaluate_backdoor(network, variables, data.test, triggered)
        return {"test_accuracy": metrics.acc, "asr": metrics.asr, "ra": metrics.ra}

    variables, state, report = threat.train_backdoored(
        state, context, network, variables, config, workdir=out / "train", evaluate=evaluate
    )
    state = threat.saved_state(state)  # what the checkpoint keeps; evaluated as reloaded
    final = evaluate(variables, state)
    attack_meta = {
        "name": attack,
        "options": threat.options(),
        "target": target,
        "ratio": ratio,
        "mode": mode,
        "seed": attack_seed,
        "clean_label": threat.clean_label,
        "poisoned_indices": data.train_indices[plan.indices],
        "num_poisoned": len(plan.indices),
        "realised_ratio": plan.ratio,
    }
    metadata = {
        "model": model_metadata(model, spec.num_classes, **model_kwargs),
        "dataset": dataset,
        "image_shape": list(spec.image_shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "attack": attack_meta,
        "clean_indices": data.clean_indices,
        "clean_seed": clean_seed,
        **_clean_split_stamp(clean_disjoint),
        "train_config": dataclasses.asdict(config),
    }
    save_checkpoint(out, variables, metadata, extras={"attack_state": state})
    result = {
        "dataset": dataset,
        "model": model,
        "model_kwargs": model_kwargs,
        "attack": {k: v for k, v in attack_meta.items() if k != "poisoned_indices"},
        "test_accuracy": final["test_accuracy"],
        "asr": final["asr"],
        "ra": final["ra"],
        "epochs": config.epochs,
        "train_examples": len(data.train),
        "wall_time_s": report.total_wall_time_s,
        "train_images_per_s": report.train_images_per_s,
        "resumed_from_step": report.resumed_from_step,
        "history": report.history,
        "train_config": dataclasses.asdict(config),
        **provenance(),
    }
    (out / "report.json").write_text(json.dumps(_jsonable(result), indent=1))
    return result


def _check_reference(reference, dataset: str, spec) -> None:
    """A reference model must be one for the attacked dataset: its classes and image shape."""
    from fippure.checkpoints import read_metadata
    from fippure.errors import InvalidInputError

    meta = read_metadata(reference)
    found = (
        meta.get("dataset"),
        (meta.get("model") or {}).get("num_classes"),
        tuple(meta.get("image_shape") or ()),
    )
    wanted = (dataset, spec.num_classes, tuple(spec.image_shape))
    if found != wanted:
        raise InvalidInputError(
            f"--reference {reference} is a model of {found[0]} ({found[1]} classes, images "
            f"{found[2]}), not of {dataset} ({spec.num_classes} classes, images "
            f"{tuple(spec.image_shape)}); train one with fippure train --dataset {dataset}"
        )


def _fitted_attack_state(threat, context, key, out: pathlib.Path):
    """``threat.fit(init_state)``, cached in ``out/attack_fit`` so a resumed run skips it.

    The fit saves its progress in ``out/attack_fit_progress`` (so a run killed during a long
    fit resumes it), which is removed once ``attack_fit`` is written. Attacks without a fit of
    their own keep ``init_state`` (a function of the key alone), and nothing is cached for
    them."""
    import shutil

    import orbax.checkpoint as ocp

    from fippure.attacks.base import Attack

    cache, progress = out / "attack_fit", out / "attack_fit_progress"
    state = threat.init_state(key, context.spec)
    if type(threat).fit is Attack.fit:
        return state
    checkpointer = ocp.StandardCheckpointer()
    if cache.exists():
        shutil.rmtree(progress, ignore_errors=True)  # left by a kill right after the cache
        # The stored structure, not init_state's: fit may add training-only entries that
        # init_state cannot size (label-consistent's adversarial images).
        return jax.tree_util.tree_map(jax.numpy.asarray, checkpointer.restore(cache))
    state = threat.fit(state, context, workdir=progress)
    if jax.tree_util.tree_leaves(state):
        out.mkdir(parents=True, exist_ok=True)
        checkpointer.save(cache, jax.device_get(state))
        checkpointer.wait_until_finished()
    shutil.rmtree(progress, ignore_errors=True)
    return state


def _jsonable(value):
    import numpy as np

    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
