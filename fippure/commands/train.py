"""``fippure train``: train a clean classifier and write a checkpoint and a JSON report."""

from __future__ import annotations

import argparse
import json

NAME = "train"
HELP = "train a clean model (resumes if --out holds an interrupted run)"


def add_common_model_args(parser: argparse.ArgumentParser) -> None:
    """Dataset, model and training options shared by ``train`` and ``attack``."""
    from fippure.cli import add_dtype_flag, add_no_progress_flag, clean_size, seed_int

    parser.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, gtsrb or digits")
    parser.add_argument(
        "--model",
        default="preact_resnet18",
        help="preact_resnet18, small_cnn, vgg11_bn, vgg16_bn or vit_small",
    )
    parser.add_argument("--width", type=int, default=None, help="model width (e.g. 16 or 64)")
    add_dtype_flag(
        parser,
        "computation dtype (bfloat16: mixed precision on GPU/TPU; the weights stay float32)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument(
        "--schedule",
        default="onecycle",
        choices=("onecycle", "cosine", "constant"),
        help="learning-rate schedule",
    )
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="coupled L2 weight decay")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N epochs")
    parser.add_argument(
        "--clean",
        type=clean_size,
        default=0.01,
        help="defender's clean set held out from training: count (500) or fraction (0.01)",
    )
    parser.add_argument("--clean-seed", type=seed_int, default=0, help="seed of the clean-set draw")
    parser.add_argument(
        "--clean-overlap",
        action="store_true",
        help="train on the clean set's images too (default: held out, SPEC section 1's choice)",
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the initialisation and batches"
    )
    parser.add_argument("--data-dir", default=None, help="TFDS data directory ($TFDS_DATA_DIR)")
    parser.add_argument("--out", required=True, help="output directory (checkpoint + report)")
    add_no_progress_flag(parser)


def train_config(args: argparse.Namespace):
    from fippure.training import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        seed=args.seed,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_model_args(parser)


def run(args: argparse.Namespace) -> int:
    from fippure.data.catalog import get_spec
    from fippure.models.registry import create_model
    from fippure.recipes import train_classifier

    spec = get_spec(args.dataset)  # fail fast on unknown names, before loading data
    create_model(args.model, spec.num_classes, width=args.width, dtype=args.dtype)
    report = train_classifier(
        dataset=args.dataset,
        model=args.model,
        out=args.out,
        config=train_config(args),
        model_kwargs={"width": args.width, "dtype": args.dtype},
        clean_size=args.clean,
        clean_seed=args.clean_seed,
        clean_disjoint=not args.clean_overlap,
        data_dir=args.data_dir,
        progress=not args.no_progress,
    )
    keys = ("test_accuracy", "epochs", "wall_time_s", "train_images_per_s")
    print(json.dumps({k: report[k] for k in keys}))
    return 0
