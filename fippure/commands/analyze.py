"""``fippure analyze``: Hessian and Fisher curvature of a checkpoint on clean training images.

Loads the checkpoint and its dataset's training split, takes ``--num-images`` clean images (the
checkpoint's stored clean set D_v when it has one, else a seeded sample of the training split),
normalises them with the checkpoint's normalisation, and reports lambda_max, Tr(H), Tr(F) and
the top eigenvalues of the eval-mode cross-entropy (SPEC section 8). Writes
``curvature.json`` and ``spectral_density.png`` into ``--out``.

Several checkpoints (before and after a defense, say) are analysed in one process, one after
the other: those of one architecture share the compiled analysis, so the second costs a
fraction of the first. Each writes into ``CHECKPOINT/analysis``, or into ``--out/NAME`` (NAME:
the checkpoint directory's name) when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

NAME = "analyze"
HELP = "curvature of a checkpoint: lambda_max, Tr(H), Tr(F), top eigenvalues, spectral density"


def configure(parser: argparse.ArgumentParser) -> None:
    from fippure.cli import positive_int, seed_int

    parser.add_argument(
        "checkpoint",
        nargs="+",
        help="checkpoint directory (from fippure train/attack/purify); several are analysed in "
        "one process and share the compiled analysis",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default CHECKPOINT/analysis; with several checkpoints, "
        "OUT/NAME for each, NAME the checkpoint directory's name)",
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=200, help="clean training images"
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the image sample and probes"
    )
    parser.add_argument(
        "--probes", type=positive_int, default=20, help="Hutchinson probes for Tr(H)"
    )
    parser.add_argument(
        "--power-iters",
        type=positive_int,
        default=50,
        help="power-iteration steps per run (a second, shifted run when negative eigenvalues "
        "dominate: up to 2N+1 products)",
    )
    parser.add_argument(
        "--lanczos-iters", type=positive_int, default=40, help="Lanczos steps per probe"
    )
    parser.add_argument("--slq-probes", type=positive_int, default=2, help="probes of the density")
    parser.add_argument("--top-k", type=positive_int, default=5, help="top eigenvalues to report")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory ($TFDS_DATA_DIR)")


def select_images(metadata: dict, train_labels, num_images: int, seed: int, path=None):
    """Indices into the training split: the stored clean set if any, else a seeded sample.

    Returns:
        ``(indices, source)`` with ``source`` ``"clean_indices"`` or ``"seeded_train_sample"``.
    """
    import numpy as np

    from fippure.zoo import stored_clean_indices

    rng = np.random.default_rng(seed)
    if metadata.get("clean_indices"):
        pool = stored_clean_indices(metadata, path, len(train_labels))
        source = "clean_indices"
    else:
        pool, source = np.arange(len(train_labels)), "seeded_train_sample"
    chosen = rng.permutation(pool)[: min(num_images, len(pool))]
    return np.sort(chosen), source


def finite_or_null(value):
    """``value`` with every non-finite float (a standard error from one probe is NaN) as
    ``None``, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def output_directories(checkpoints: list, out: str | None) -> list[pathlib.Path]:
    """Where each checkpoint's analysis goes: ``--out`` for one checkpoint, ``--out/NAME`` for
    several (names must then differ), ``CHECKPOINT/analysis`` without ``--out``."""
    from fippure.errors import InvalidInputError

    if out is None:
        return [c.path / "analysis" for c in checkpoints]
    if len(checkpoints) == 1:
        return [pathlib.Path(out)]
    names = [c.path.name for c in checkpoints]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInputError(
            f"with --out, the checkpoints' directory names must differ (each writes to "
            f"--out/NAME); repeated: {', '.join(repeated)}"
        )
    return [pathlib.Path(out) / name for name in names]


def run(args: argparse.Namespace) -> int:
    from fippure.checkpoints import load_checkpoint
    from fippure.commands.output import prepare_output
    from fippure.curvature.analysis import AnalysisConfig

    config = AnalysisConfig(
        hutchinson_probes=args.probes,
        power_iters=args.power_iters,
        lanczos_iters=args.lanczos_iters,
        slq_probes=args.slq_probes,
        top_k=args.top_k,
    )
    # every checkpoint and output directory is checked before the first analysis starts
    checkpoints = [load_checkpoint(path) for path in args.checkpoint]
    outs = [prepare_output(out) for out in output_directories(checkpoints, args.out)]
    train_splits = {}
    for checkpoint, out in zip(checkpoints, outs, strict=True):
        analyze_checkpoint(checkpoint, out, config, args, train_splits)
    return 0


def analyze_checkpoint(checkpoint, out: pathlib.Path, config, args, train_splits: dict) -> None:
    """Analyses one loaded checkpoint into ``out`` and prints its summary as one JSON line;
    ``train_splits`` caches each dataset's training split across checkpoints."""
    import jax
    import numpy as np

    from fippure.curvature.analysis import analyze_curvature, lambda_max_warnings, plot_density
    from fippure.data.catalog import get_spec
    from fippure.data.pipeline import normalize, to_unit_range
    from fippure.data.sources import load_dataset
    from fippure.errors import InvalidInputError
    from fippure.provenance import provenance
    from fippure.zoo import check_image_shape

    metadata = checkpoint.metadata
    dataset = metadata.get("dataset")
    if not dataset:
        raise InvalidInputError(f"checkpoint {checkpoint.path} names no dataset in its metadata")
    spec = get_spec(dataset)
    check_image_shape(metadata, checkpoint.path, spec)
    stored_norm = metadata.get("normalization") or {}
    if stored_norm.get("mean") and stored_norm.get("std"):
        spec = dataclasses.replace(
            spec, mean=tuple(stored_norm["mean"]), std=tuple(stored_norm["std"])
        )
    if dataset not in train_splits:
        train_splits[dataset] = load_dataset(dataset, "train", data_dir=args.data_dir)
    train = train_splits[dataset]
    indices, source = select_images(
        metadata, train.labels, args.num_images, args.seed, checkpoint.path
    )
    if len(indices) < args.num_images:
        print(
            f"fippure analyze: note: the clean set of {checkpoint.path} holds {len(indices)} "
            f"images; using them all (--num-images asked for {args.num_images})",
            file=sys.stderr,
        )
    inputs = normalize(to_unit_range(jax.numpy.asarray(train.images[indices])), spec)
    labels = np.asarray(train.labels[indices], np.int32)

    report, density = analyze_curvature(
        checkpoint.model,
        checkpoint.variables,
        inputs,
        labels,
        jax.random.key(args.seed),
        config,
    )
    attack = metadata.get("attack")
    if isinstance(attack, dict):  # the poisoned indices are long and not needed here
        attack = {k: v for k, v in attack.items() if k != "poisoned_indices"}
    report = {
        "checkpoint": str(checkpoint.path),
        "dataset": dataset,
        "model": metadata["model"],
        "attack": attack,
        "image_source": source,
        "image_indices": indices.tolist(),
        **report,
        **provenance(),
    }
    (out / "curvature.json").write_text(json.dumps(finite_or_null(report), indent=1))
    name = attack.get("name") if isinstance(attack, dict) else (attack or "clean")
    plot_density(
        density,
        out / "spectral_density.png",
        title=(
            f"{metadata['model']['name']} on {dataset} ({name}): "
            f"lambda_max {report['lambda_max']:.3g}, Tr(H) {report['trace_hessian']:.4g}"
        ),
    )
    for line in lambda_max_warnings(report, config):
        print(f"fippure analyze: warning: {checkpoint.path}: {line}", file=sys.stderr)
    summary = {
        k: report[k]
        for k in ("lambda_max", "trace_hessian", "trace_empirical_fisher", "top_eigenvalues")
    }
    print(json.dumps({**summary, "out": str(out)}))
