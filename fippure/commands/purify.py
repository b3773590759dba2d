"""``fippure purify``: run a defense on a backdoored checkpoint and evaluate it."""

from __future__ import annotations

import argparse
import json

NAME = "purify"
HELP = "purify a backdoored checkpoint with a defense and report ACC/ASR/RA/DER"


def configure(parser: argparse.ArgumentParser) -> None:
    from fippure.cli import (
        add_clean_subset_flag,
        add_dtype_flag,
        add_no_progress_flag,
        add_overrides_flag,
        key_value,
        seed_int,
    )

    parser.add_argument("--checkpoint", required=True, help="a fippure attack checkpoint")
    parser.add_argument("--defense", required=True, help="fip, fast_fip, nft, ngf, ft or ft_sam")
    add_clean_subset_flag(parser)
    add_overrides_flag(parser, "override a config value, e.g. --set eta_F=0.001 (repeatable)")
    add_dtype_flag(
        parser,
        "compute in this dtype instead of the checkpoint's (bfloat16 on GPU/TPU; the "
        "weights stay float32)",
    )
    parser.add_argument(
        "--stop-on-clean-set",
        action="store_true",
        help="choose the step count on D_v: hold out a validation slice, synthesize a trigger "
        "(Neural Cleanse), and stop where its ASR falls (fippure.purify.clean_stop)",
    )
    parser.add_argument(
        "--stop-set",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --stop-on-clean-set: override its settings, e.g. --stop-set max_steps=200 "
        "--stop-set inversion.steps=300 (repeatable)",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the defense")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (the run saves its progress there and, killed, resumes from it; "
        "not with --stop-on-clean-set, whose search starts again)",
    )
    parser.add_argument("--data-dir", default=None, help="TFDS data directory ($TFDS_DATA_DIR)")
    add_no_progress_flag(parser)


def run(args: argparse.Namespace) -> int:
    from fippure.checkpoints import read_metadata
    from fippure.cli import unique_pairs
    from fippure.errors import InvalidInputError
    from fippure.purify.clean_stop import make_clean_stop_config
    from fippure.purify.registry import make_config
    from fippure.purify.runner import run_defense

    overrides = unique_pairs(args.set, "--set")
    make_config(args.defense, overrides)  # validate before loading anything
    if args.stop_set and not args.stop_on_clean_set:
        raise InvalidInputError("--stop-set applies with --stop-on-clean-set")
    clean_stop = (
        make_clean_stop_config(unique_pairs(args.stop_set, "--stop-set"))
        if args.stop_on_clean_set
        else None
    )
    read_metadata(args.checkpoint)
    result = run_defense(
        args.checkpoint,
        args.defense,
        overrides=overrides,
        clean_size=args.clean,
        seed=args.seed,
        out=args.out,
        data_dir=args.data_dir,
        dtype=args.dtype,
        progress=not args.no_progress,
        clean_stop=clean_stop,
    )
    print(format_table(result))
    print(json.dumps({"before": result["before"], "after": result["after"], "der": result["der"]}))
    return 0


def format_table(result: dict) -> str:
    """A before/after table for the terminal."""

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    rows = [
        f"{'':8} {'ACC':>8} {'ASR':>8} {'RA':>8}",
        *(
            f"{name:8} {cell(m['acc']):>8} {cell(m['asr']):>8} {cell(m['ra']):>8}"
            for name, m in (("before", result["before"]), ("after", result["after"]))
        ),
    ]
    stop = result["report"]["extra"].get("clean_stop")
    if stop is not None:
        rows.append(
            f"stop chosen on D_v: step {stop['chosen_step']} ("
            f"{stop.get('steps_run', stop['searched_steps'])} of up to {stop['searched_steps']} "
            f"steps run; suspect class {stop['suspect_target']}, threshold "
            f"{'reached' if stop['reached_threshold'] else 'not reached'})"
        )
    if result.get("der") is not None:
        rows.append(
            f"DER {result['der']:.4f}  ({result['defense']}, "
            f"{result['report']['wall_time_s']:.1f} s)"
        )
    return "\n".join(rows)
