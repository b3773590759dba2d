"""Does purification in bfloat16 give what it gives in float32? (``fippure.models`` ``dtype``)

The same defense, configuration, clean set and seed, with the model computing in float32 and
in bfloat16 (float32 weights, logits and Fisher terms either way):

- digits: the demo's BadNets small CNN and FIP setting (``fippure demo --dataset digits``),
  seeds 0-2;
- CIFAR-10: the zoo's PreAct-ResNet-18 w16 BadNets and Blend models with FIP
  ``midway_averaged_transfer`` and NFT ``brief_transfer`` (``purify_benchmark.py``'s
  settings), seed 0.

Each run is saved as it finishes under ``--work`` (``runs/mixed_precision`` by default), so a
killed run resumes where it stopped (a saved run whose setting has changed is measured
again). Writes ``mixed_precision.{json,md}`` under ``--out``; the cases left out of ``--cases``
keep the rows that file already holds.
This measures quality, not speed: on the CPU bfloat16 is emulated and slower (the speed on a
GPU is ``accelerator_check.py``'s ``speed_w16_bf16``)::

    python experiments/mixed_precision.py [--cases digits,cifar10] [--work runs/mixed_precision]
    python experiments/mixed_precision.py --report-only   # the table from the stored JSON
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
DTYPES = ("float32", "bfloat16")

sys.path.insert(0, str(ROOT / "experiments"))


def _runs() -> list[dict]:
    """Every run: case, source, defense, overrides and seed (dtype is added per run)."""
    from purify_benchmark import overrides_for

    from fippure.commands.demo import DIGITS_FIP

    runs = [
        {
            "case": "digits",
            "attack": "badnets",
            "defense": "fip",
            "setting": "demo",
            "overrides": DIGITS_FIP,
            "seed": seed,
        }
        for seed in range(3)
    ]
    for attack in ("badnets", "blend"):
        for method, setting in (("fip", "midway_averaged_transfer"), ("nft", "brief_transfer")):
            runs.append(
                {
                    "case": "cifar10",
                    "attack": attack,
                    "defense": method,
                    "setting": setting,
                    "overrides": overrides_for(method, setting),
                    "seed": 0,
                }
            )
    return runs


def _key(run: dict, dtype: str) -> str:
    parts = (run["case"], run["attack"], run["defense"], run["setting"], f"s{run['seed']}", dtype)
    return "__".join(parts)


def _source(run: dict, work: pathlib.Path) -> pathlib.Path:
    if run["case"] == "cifar10":
        return ZOO / run["attack"]
    from fippure.commands.demo import _digits_backdoor

    return _digits_backdoor(work / "digits_badnets_s0", seed=0, progress=False)


def measure(run: dict, dtype: str, work: pathlib.Path) -> dict:
    from fippure.purify.runner import run_defense

    result = run_defense(
        _source(run, work),
        run["defense"],
        overrides=run["overrides"],
        seed=run["seed"],
        dtype=None if dtype == "float32" else dtype,
        progress=True,
    )
    return {
        **{k: run[k] for k in ("case", "attack", "defense", "setting", "seed")},
        "dtype": dtype,
        "overrides": dict(run["overrides"]),
        "before": result["before"],
        "after": result["after"],
        "wall_time_s": result["report"]["wall_time_s"],
        "step_time_s": result["report"]["step_time_s"],
        **{k: result[k] for k in ("command", "git_revision", "machine", "date")},
    }


def report_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Purification in bfloat16 against float32",
        "",
        "The same defense, setting, clean set and seed with the model computing in float32 and "
        "in bfloat16 (`--dtype bfloat16`: float32 weights, BatchNorm statistics, logits and "
        "loss). Each cell: ACC / ASR, of the undefended model (`before`) and after the defense. "
        "This measures quality only: on the CPU bfloat16 arithmetic is emulated, so "
        "the step times (last columns) say nothing about an accelerator.",
        "",
        "| model | defense (setting) | seed | before | float32 | bfloat16 | ms/step f32 | "
        "ms/step bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {
        (r["case"], r["attack"], r["defense"], r["setting"], r["seed"], r["dtype"]): r
        for r in results
    }
    groups = sorted({k[:5] for k in by}, key=lambda k: (k[0] != "digits", k))

    def cell(metrics: dict) -> str:
        return f"{metrics['acc']:.3f} / {metrics['asr']:.3f}"

    for group in groups:
        full, reduced = by.get((*group, "float32")), by.get((*group, "bfloat16"))
        case, attack, defense, setting, seed = group
        model = "digits small_cnn" if case == "digits" else f"cifar10 w16 {attack}"
        after = [cell(r["after"]) if r else "-" for r in (full, reduced)]
        speed = [f"{r['step_time_s'] * 1e3:.0f}" if r else "-" for r in (full, reduced)]
        before = cell((full or reduced)["before"])
        lines.append(
            f"| {model} | {defense} ({setting}) | {seed} | {before} | {' | '.join(after)} | "
            f"{' | '.join(speed)} |"
        )
    digits = [r for r in results if r["case"] == "digits"]
    if digits:
        lines += ["", "Digits, median over seeds (ACC / ASR after):", ""]
        for dtype in DTYPES:
            chosen = [r["after"] for r in digits if r["dtype"] == dtype]
            if chosen:
                acc = statistics.median(m["acc"] for m in chosen)
                asr = statistics.median(m["asr"] for m in chosen)
                lines.append(f"- {dtype}: {acc:.3f} / {asr:.3f} ({len(chosen)} seeds)")
    lines += ["", *provenance_lines(results), "", written_by(meta)]
    return "\n".join(lines) + "\n"


def provenance_lines(results: list[dict]) -> list[str]:
    """Where the runs come from, one line per command, revision and machine, naming its
    cases and dtypes and the dates they finished (runs saved before the command, machine and
    date were kept with each say so)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("command"), r["git_revision"], r.get("machine")), []).append(r)
    lines = [
        "Runs (each saved as it finished, so a rerun of the script reuses them; cases "
        "not asked for keep their rows):",
        "",
    ]
    for (command, revision, machine), runs in groups.items():
        names = ", ".join(dict.fromkeys(f"{r['case']} {r['dtype']}" for r in runs))
        if command is None:
            lines.append(f"- {names}: at {revision} (command, machine and date not recorded)")
            continue
        dates = sorted(r["date"] for r in runs)
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"- {names}: `{command}` at {revision} on {machine}, {when}")
    return lines


def written_by(meta: dict) -> str:
    return (
        f"Table written by `{meta['command']}` at {meta['git_revision']} on {meta['machine']}, "
        f"{meta['date']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="digits,cifar10")
    parser.add_argument("--work", default=str(ROOT / "runs" / "mixed_precision"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table from the stored JSON"
    )
    args = parser.parse_args()

    from fippure.provenance import provenance

    cases = set() if args.report_only else set(args.cases.split(","))
    work = pathlib.Path(args.work)
    done_dir = work / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    out = pathlib.Path(args.out)
    # the cases not asked for keep their rows from the table already written
    previous = out / "mixed_precision.json"
    results = []
    if previous.exists():
        results = [r for r in json.loads(previous.read_text())["runs"] if r["case"] not in cases]
    for run in _runs():
        if run["case"] not in cases:
            continue
        for dtype in DTYPES:
            path = done_dir / f"{_key(run, dtype)}.json"
            saved = json.loads(path.read_text()) if path.exists() else None
            # a saved run is reused only while its setting is still the run's (the demo's can move)
            if saved is None or saved["overrides"] != dict(run["overrides"]):
                print(f"--- {_key(run, dtype)}", flush=True)
                saved = measure(run, dtype, work)
                path.write_text(json.dumps(saved, indent=1))
            results.append(saved)
    meta = provenance()
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_precision.json").write_text(
        json.dumps({"provenance": meta, "runs": results}, indent=1)
    )
    (out / "mixed_precision.md").write_text(report_markdown(results, meta))
    print(report_markdown(results, meta))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "mixed_precision.py")
