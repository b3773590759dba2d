"""One defense on one zoo model with overrides: a single measurement outside the benchmark grid.

    python experiments/probe_defense.py badnets nft bn_train=false

writes ``experiments/results/probes/<attack>__<defense>__<overrides>__s<seed>.json`` with the
command, git revision, machine and date.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

from fippure.cli import key_value

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "probes"


def override_tag(overrides: dict[str, str], empty: str = "default") -> str:
    """The overrides as a file-name part, ``key1value1_key2value2``; characters other than
    letters, digits, ``.``, ``-`` and ``=`` (a ``/`` in a regular expression, say) become
    ``_``."""
    tag = "_".join(f"{k}{v}" for k, v in overrides.items()) or empty
    return re.sub(r"[^\w.=-]", "_", tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", help="zoo entry, e.g. badnets")
    parser.add_argument("defense", help="fip, fast_fip, nft, ngf, ft or ft_sam")
    parser.add_argument(
        "overrides", nargs="*", type=key_value, help="key=value configuration overrides"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from fippure.provenance import provenance
    from fippure.purify.runner import run_defense

    overrides = dict(args.overrides)
    # Named before the run, so a name the file system refuses cannot lose a finished run.
    path = OUT / f"{args.attack}__{args.defense}__{override_tag(overrides)}__s{args.seed}.json"
    result = run_defense(
        ZOO / args.attack, args.defense, overrides=overrides, seed=args.seed, progress=True
    )
    result["report"].pop("loss_curve_full", None)
    result["overrides"] = overrides
    result["provenance"] = provenance()
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"{path.name}: before {result['before']} after {result['after']}")


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "probe_defense.py")
