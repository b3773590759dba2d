"""``fippure attack``: train a backdoored model and checkpoint it with its attack state."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "attack"
HELP = "train a backdoored model (resumes if --out holds an interrupted run)"


def attack_option(text: str) -> tuple[str, object]:
    """Parses ``--option key=value`` (value as JSON when possible, else a string)."""
    from fippure.cli import key_value

    key, value = key_value(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def configure(parser: argparse.ArgumentParser) -> None:
    from fippure.cli import seed_int
    from fippure.commands.train import add_common_model_args

    add_common_model_args(parser)
    parser.add_argument(
        "--attack",
        required=True,
        help="badnets, blend, bpp, clb, ftrojan, input_aware, issba, lf, lira, sig, trojan "
        "or wanet",
    )
    parser.add_argument("--ratio", type=float, default=0.1, help="poisoned / training set")
    parser.add_argument(
        "--target", type=int, default=None, help="target class (all-to-one; default 0)"
    )
    parser.add_argument(
        "--mode", default="all_to_one", choices=("all_to_one", "all_to_all"), help="label mapping"
    )
    parser.add_argument(
        "--attack-seed", type=seed_int, default=0, help="seed of the poisoned rows and trigger"
    )
    parser.add_argument(
        "--option",
        type=attack_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attack hyper-parameter, e.g. --option alpha=0.1 (repeatable)",
    )
    parser.add_argument(
        "--reference", default=None, help="clean model checkpoint (needed by clb and lf)"
    )


def run(args: argparse.Namespace) -> int:
    from fippure.attacks import make_attack, validate_attack_args
    from fippure.cli import unique_pairs
    from fippure.commands.train import train_config
    from fippure.data.catalog import get_spec
    from fippure.errors import InvalidInputError
    from fippure.models.registry import create_model
    from fippure.recipes import train_backdoored

    spec = get_spec(args.dataset)  # fail fast, before any data is loaded
    create_model(args.model, spec.num_classes, width=args.width, dtype=args.dtype)
    options = unique_pairs(args.option, "--option")
    threat = make_attack(args.attack, **options)
    if args.target is not None and args.mode == "all_to_all":
        raise InvalidInputError(
            "--target does not apply to --mode all_to_all (each class y goes to (y + 1) mod K)"
        )
    target = 0 if args.target is None else args.target
    validate_attack_args(
        ratio=args.ratio,
        target=target,
        mode=args.mode,
        num_classes=spec.num_classes,
        clean_label=threat.clean_label,
    )
    report = train_backdoored(
        dataset=args.dataset,
        model=args.model,
        out=args.out,
        config=train_config(args),
        attack=args.attack,
        attack_options=options,
        target=target,
        ratio=args.ratio,
        mode=args.mode,
        attack_seed=args.attack_seed,
        model_kwargs={"width": args.width, "dtype": args.dtype},
        clean_size=args.clean,
        clean_seed=args.clean_seed,
        clean_disjoint=not args.clean_overlap,
        data_dir=args.data_dir,
        reference=args.reference,
        progress=not args.no_progress,
    )
    keys = ("test_accuracy", "asr", "ra", "epochs", "wall_time_s", "train_images_per_s")
    realised, poisoned = report["attack"]["realised_ratio"], report["attack"]["num_poisoned"]
    # short by more than rounding: a clean-label attack ran out of target-class images
    if poisoned + 1 < args.ratio * report["train_examples"]:
        print(
            f"fippure: note: {args.attack} poisons target-class images only; it poisoned "
            f"{poisoned} ({realised:.4f} of the training set), not {args.ratio}",
            file=sys.stderr,
        )
    print(json.dumps({**{k: report[k] for k in keys}, "realised_ratio": realised}))
    return 0
