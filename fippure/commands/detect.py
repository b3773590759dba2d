"""``fippure detect``: Neural Cleanse on a checkpoint's clean set (no test data)."""

from __future__ import annotations

import argparse
import dataclasses
import json

NAME = "detect"
HELP = (
    "synthesize a trigger per class from the clean set (Neural Cleanse) and flag the classes "
    "whose trigger is anomalously small"
)


def configure(parser: argparse.ArgumentParser) -> None:
    from fippure.cli import (
        add_clean_subset_flag,
        add_no_progress_flag,
        add_overrides_flag,
        seed_int,
    )

    parser.add_argument("--checkpoint", required=True, help="a fippure checkpoint")
    add_clean_subset_flag(parser)
    add_overrides_flag(
        parser, "override an InversionConfig value, e.g. --set steps=150 (repeatable)"
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the trigger search")
    parser.add_argument(
        "--out", default=None, help="write the scan (norms, flags, masks and patterns) here"
    )
    parser.add_argument("--data-dir", default=None, help="TFDS data directory ($TFDS_DATA_DIR)")
    add_no_progress_flag(parser)


def inversion_config(overrides: dict[str, str]):
    """An :class:`InversionConfig` with ``overrides`` parsed and checked (one-line errors)."""
    from fippure.purify.registry import config_with_overrides
    from fippure.purify.trigger_inversion import InversionConfig

    return config_with_overrides(InversionConfig, overrides, "trigger inversion")


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from fippure.checkpoints import read_metadata
    from fippure.cli import unique_pairs
    from fippure.commands.output import prepare_output
    from fippure.provenance import provenance
    from fippure.purify.trigger_inversion import scan_classes
    from fippure.zoo import load_backdoored

    config = inversion_config(unique_pairs(args.set, "--set"))  # validate before loading anything
    read_metadata(args.checkpoint)
    out = None if args.out is None else prepare_output(args.out)
    backdoored = load_backdoored(args.checkpoint, data_dir=args.data_dir, clean_size=args.clean)
    scan = scan_classes(
        backdoored.model,
        backdoored.variables,
        backdoored.clean,
        config,
        jax.random.key(args.seed),
        progress=not args.no_progress,
    )
    print(format_scan(scan))
    summary = {
        "checkpoint": str(args.checkpoint),
        "clean_examples": len(backdoored.clean),
        **scan.to_dict(),
        "config": dataclasses.asdict(config),
        "seed": args.seed,
        **provenance(),
    }
    if out is not None:
        (out / "scan.json").write_text(json.dumps(summary, indent=1))
        np.savez(
            out / "triggers.npz",
            masks=np.stack([t.mask for t in scan.triggers]),
            patterns=np.stack([t.pattern for t in scan.triggers]),
        )
    print(json.dumps({"flagged": list(scan.flagged)}))
    return 0


def format_scan(scan) -> str:
    """One row per class: mask norm, the stamp's success on the clean set, anomaly index."""
    rows = [f"{'class':>5} {'mask px':>8} {'success':>8} {'anomaly':>8}"]
    for k, trigger in enumerate(scan.triggers):
        mark = "  <- flagged" if k in scan.flagged else ""
        rows.append(
            f"{k:>5} {trigger.mask_l1:>8.2f} {trigger.success:>8.3f} "
            f"{scan.anomaly_index[k]:>8.2f}{mark}"
        )
    verdict = (
        f"flagged: {', '.join(map(str, scan.flagged))}"
        if scan.flagged
        else "no class flagged (no anomalously small trigger)"
    )
    return "\n".join([*rows, verdict])
