"""What a defense's final BatchNorm statistics do to ACC and ASR: one run, four choices.

    python experiments/bn_statistics_probe.py badnets fip learning_rate=0.001 eta_F=2 \\
        trace_bn_train=true steps=100
    python experiments/bn_statistics_probe.py badnets none

runs the defense once (``none``: the undefended model) with its running statistics, then
evaluates the same weights with each ``final_batch_stats`` choice:

- ``running``: the statistics the defense's train-mode steps left;
- ``stored``: the original model's statistics, unchanged (a reference point, not an option);
- ``recompute``: re-estimated on D_v (:func:`fippure.purify.batch_stats.recompute_batch_stats`);
- ``transfer``: the stored ones moved by the change measured on D_v
  (:func:`fippure.purify.batch_stats.transfer_batch_stats`).

The choices see only the clean set; the test split scores them afterwards. Each run is written
to ``experiments/results/probes/bn_statistics/`` and the table of all runs to
``experiments/results/probes/bn_statistics.md``, with the command, revision, machine and date.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from probe_defense import override_tag

from fippure.cli import key_value

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "probes" / "bn_statistics"
TABLE = OUT.parent / "bn_statistics.md"
CHOICES = ("running", "stored", "recompute", "transfer")


def write_table() -> None:
    from fippure.provenance import provenance

    lines = [
        "# Final BatchNorm statistics after a defense (CIFAR-10, PreAct-ResNet-18 w16, 500 clean)",
        "",
        "Each row is one defense run (its seed in the `seed` column); its weights are "
        "evaluated with each choice of "
        "running statistics. Cells: test ACC / ASR. `stored` is the original model's "
        "statistics unchanged (a reference point). `recompute` and `transfer` average "
        "20 clean batches of 128.",
        "",
        "| attack | defense | overrides | seed | " + " | ".join(CHOICES) + " | defense time |",
        "|---|---|---|---|" + "---|" * (len(CHOICES) + 1),
    ]
    for path in sorted(OUT.glob("*.json")):
        run = json.loads(path.read_text())
        cells = " | ".join(
            f"{run['choices'][c]['acc']:.4f} / {run['choices'][c]['asr']:.4f}" for c in CHOICES
        )
        overrides = ", ".join(f"{k}={v}" for k, v in run["overrides"].items()) or "-"
        seconds = f"{run['defense_seconds']:.0f} s" if run["defense_seconds"] else "-"
        lines.append(
            f"| {run['attack']} | {run['defense']} | {overrides} | {run.get('seed', 0)} | "
            f"{cells} | {seconds} |"
        )
    lines += ["", "Runs (command, revision, machine, date):", ""]
    for path in sorted(OUT.glob("*.json")):
        run = json.loads(path.read_text())
        lines.append(
            f"- `{run['command']}` at {run['git_revision']} on {run['machine']}, {run['date']}"
        )
    for path in sorted(OUT.glob("*.json")):
        run = json.loads(path.read_text())
        for key, note in run.get("relabelled", {}).items():
            lines.append(f"- `{path.name}`, {key} relabelled: {note}")
    meta = provenance()
    lines += ["", f"Table written by `{meta['command']}` on {meta['date']}."]
    TABLE.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", nargs="?", help="zoo entry, e.g. badnets")
    parser.add_argument("defense", nargs="?", help="a defense name, or none")
    parser.add_argument(
        "overrides", nargs="*", type=key_value, help="key=value configuration overrides"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.table_only:
        write_table()
        return
    if not args.attack or not args.defense:
        parser.error("give an attack and a defense (or --table-only)")

    import jax

    from fippure.provenance import provenance
    from fippure.purify.batch_stats import finalise_batch_stats
    from fippure.purify.registry import get_defense, make_config
    from fippure.purify.runner import evaluate
    from fippure.zoo import load_backdoored

    overrides = dict(args.overrides)
    name = override_tag(overrides, empty="defaults")
    path = OUT / f"{args.attack}__{args.defense}__{name}__s{args.seed}.json"
    backdoored = load_backdoored(ZOO / args.attack)
    original = backdoored.variables
    seconds = None
    if args.defense == "none":
        purified = original
    else:
        config = make_config(args.defense, {**overrides, "final_batch_stats": "running"})
        started = time.perf_counter()
        purified, _ = get_defense(args.defense).purify(
            backdoored.model, original, backdoored.clean, config, jax.random.key(args.seed)
        )
        seconds = time.perf_counter() - started
    key = jax.random.key(args.seed + 1)
    variants = {
        "running": purified,
        "stored": {**purified, "batch_stats": original["batch_stats"]},
        **{
            mode: finalise_batch_stats(
                mode, backdoored.model, original, purified, backdoored.clean, key
            )
            for mode in ("recompute", "transfer")
        },
    }
    result = {
        "attack": args.attack,
        "defense": args.defense,
        "overrides": overrides,
        "seed": args.seed,
        "defense_seconds": seconds,
        "choices": {name: evaluate(backdoored, v) for name, v in variants.items()},
        **provenance(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["choices"]))
    write_table()


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "bn_statistics_probe.py")
