"""Re-runs stored purification-benchmark runs and compares the metrics: does a result reproduce
on this machine, at this revision?

    python experiments/rerun_check.py badnets__nft__default__s0__clean10 \\
        badnets__ft__brief_transfer__s0

Each name is a run file of ``experiments/results/purify_runs/`` without ``.json`` (tags: none,
or ``clean10``). The run is repeated with the overrides and seed stored in it, on the same zoo
entry and clean set; the stored file is left as it is. Each comparison is written to
``experiments/results/reruns/<name>.json`` and the table of all of them to
``experiments/results/reruns.md``, with the command, revision, machine and date of both runs.
``python experiments/rerun_check.py --table-only`` rewrites the table alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import purify_benchmark as benchmark  # noqa: E402

OUT = benchmark.RESULTS / "reruns"
TABLE = benchmark.RESULTS / "reruns.md"
#: Clean-set size per run tag (the benchmark's ``clean10`` extras draw 10 images).
CLEAN_SIZE = {"": None, "clean10": 10}


def rerun(name: str) -> dict:
    from fippure.purify.runner import run_defense

    stored = json.loads((benchmark.RUNS / f"{name}.json").read_text())
    if stored.get("after") is None:
        raise SystemExit(
            f"rerun_check: {name} diverged ({stored.get('diverged')}); nothing to compare"
        )
    tag = stored.get("tag", "")
    if tag not in CLEAN_SIZE:
        raise SystemExit(f"rerun_check: runs tagged {tag!r} are not supported ({name})")
    entry = name.split("__")[0]
    backdoored, before = benchmark.load_attack(entry, clean_size=CLEAN_SIZE[tag])
    result = run_defense(
        backdoored,
        stored["defense"],
        overrides=stored["overrides"],
        seed=stored["seed"],
        before=before,
        progress=True,
    )
    keys = ("command", "git_revision", "machine", "date")
    return {
        "name": name,
        "stored": {"after": stored["after"], **{k: stored[k] for k in keys}},
        "rerun": {"after": result["after"], **{k: result[k] for k in keys}},
        "identical": stored["after"] == result["after"],
        "max_abs_difference": max(
            abs(stored["after"][k] - result["after"][k]) for k in ("acc", "asr", "ra")
        ),
    }


def write_table() -> None:
    from fippure.provenance import provenance

    lines = [
        "# Re-runs of stored benchmark runs",
        "",
        "Each stored run (`purify_runs/`) repeated with its own overrides and seed. Cells: test "
        "ACC / ASR.",
        "",
        "| run | stored | rerun | largest difference (ACC, ASR, RA) | stored at | rerun at |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        s, n = r["stored"], r["rerun"]
        lines.append(
            f"| {r['name']} | {s['after']['acc']:.4f} / {s['after']['asr']:.4f} | "
            f"{n['after']['acc']:.4f} / {n['after']['asr']:.4f} | {r['max_abs_difference']:.4f} | "
            f"{s['git_revision'][:12]}, {s['date']} | {n['git_revision'][:12]}, {n['date']} |"
        )
    machines = sorted({json.loads(p.read_text())["rerun"]["machine"] for p in OUT.glob("*.json")})
    lines += ["", "Re-run on: " + "; ".join(machines) + ".", "", "Commands (stored; rerun):", ""]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        s, n = r["stored"], r["rerun"]
        lines.append(
            f"- {r['name']}: `{s['command']}` on {s['machine']}; `{n['command']}` on "
            f"{n['machine']}{benchmark.replaced_note(r)}"
        )
    meta = provenance()
    lines += [
        "",
        f"Table written by `{meta['command']}` at {meta['git_revision']} on {meta['machine']}, "
        f"{meta['date']}.",
    ]
    TABLE.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run file names without .json")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the table from the stored re-runs"
    )
    args = parser.parse_args()
    if args.table_only:
        if args.runs:
            parser.error("--table-only takes no runs")
        write_table()
        return
    if not args.runs:
        parser.error("name the runs to repeat, or pass --table-only")
    missing = [n for n in args.runs if not (benchmark.RUNS / f"{n}.json").exists()]
    if missing:
        parser.error(f"no stored run {', '.join(missing)} in {benchmark.RUNS}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        (OUT / f"{name}.json").write_text(json.dumps(rerun(name), indent=1))
    write_table()


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "rerun_check.py")
