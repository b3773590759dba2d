"""How FIP's outcome depends on the trace strength, the learning rate and clipping (SPEC
section 2: "calibrate eta_F ... and report the sensitivity").

Launch (resumable; one JSON per run under ``experiments/results/fip_sensitivity_runs/``)::

    python experiments/fip_sensitivity.py --attacks badnets,blend --steps 300

Every run is FIP on a zoo model with the 500 clean images; ``eta_F = 0, eta_r = 0`` is plain
fine-tuning with FIP's optimiser (the reference at the same learning rate and budget). The
strength is relative to the Fisher trace at theta0 (``trace_scale=relative``). Writes
``experiments/results/fip_sensitivity.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from purify_benchmark import RESULTS, load_attack, run_one

RUNS = RESULTS / "fip_sensitivity_runs"

#: name -> FIP overrides (besides steps); names starting with ``fast_`` run Fast FIP.
#: SPEC section 2's prototype: the absolute trace penalty eta_F = 1e-3 at lr 0.001, 200 steps.
PROTOTYPE = {"learning_rate": "0.001", "trace_scale": "absolute", "eta_F": "0.001", "steps": "200"}

GRID = {
    "ft_lr0.005": {"learning_rate": "0.005", "eta_F": "0", "eta_r": "0"},
    "fip_lr0.005_eta0.1": {"learning_rate": "0.005", "eta_F": "0.1"},
    "fip_lr0.005_eta1": {"learning_rate": "0.005", "eta_F": "1"},
    "fip_lr0.005_eta1_clip10": {"learning_rate": "0.005", "eta_F": "1", "max_grad_norm": "10"},
    "ft_lr0.001": {"learning_rate": "0.001", "eta_F": "0", "eta_r": "0"},
    "fip_lr0.001_eta1": {"learning_rate": "0.001", "eta_F": "1"},
    "fip_lr0.001_eta3": {"learning_rate": "0.001", "eta_F": "3"},
    # The anchor strength eta_r (SPEC: 5, sweep {0.1, 1, 5}) at the setting that removes
    # BadNets, and one far stronger anchor to see whether it buys back accuracy.
    "fip_lr0.001_eta3_anchor0.1": {"learning_rate": "0.001", "eta_F": "3", "eta_r": "0.1"},
    "fip_lr0.001_eta3_anchor1": {"learning_rate": "0.001", "eta_F": "3", "eta_r": "1"},
    "fip_lr0.001_eta3_anchor100": {"learning_rate": "0.001", "eta_F": "3", "eta_r": "100"},
    "fip_lr0.005_eta1_frozenbn": {"learning_rate": "0.005", "eta_F": "1", "bn_train": "false"},
    # SPEC section 2's prototype on Blend, without and with the anchor (it measured
    # ASR 0.029 / ACC 0.769 and ASR 0.009 / ACC 0.804).
    "prototype_trace_only": {**PROTOTYPE, "eta_r": "0"},
    "prototype_full": {**PROTOTYPE, "eta_r": "5"},
    # The same two runs with the trace term's BatchNorm in train mode (batch statistics).
    "prototype_trace_only_bntrain": {**PROTOTYPE, "eta_r": "0", "trace_bn_train": "true"},
    "prototype_full_bntrain": {**PROTOTYPE, "eta_r": "5", "trace_bn_train": "true"},
    "fast_fip_lr0.05_eta1": {"learning_rate": "0.05", "eta_F": "1"},
    "fast_fip_lr0.5_eta1": {"learning_rate": "0.5", "eta_F": "1"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="badnets")
    parser.add_argument("--runs", default=",".join(GRID))
    parser.add_argument(
        "--steps", type=int, default=300, help="steps of the runs that do not fix their own"
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        sys.exit(f"fip_sensitivity: unknown runs {unknown}; known: {', '.join(GRID)}")
    if not args.report_only:
        for attack in args.attacks.split(","):
            backdoored, before = load_attack(attack)
            for name in names:
                overrides = {"steps": str(args.steps), **GRID[name]}
                method = "fast_fip" if name.startswith("fast_") else "fip"
                run_one(backdoored, attack, method, name, 0, before, overrides=overrides, runs=RUNS)
    write_report()


def settings(overrides: dict[str, str]) -> str:
    """The run's overrides in a table cell (FIP's defaults are eta_F 1 relative, eta_r 5)."""
    return ", ".join(f"{key} {value}" for key, value in sorted(overrides.items()))


def write_report() -> None:
    from fippure.provenance import provenance

    rows = []
    for path in sorted(RUNS.glob("*.json")):
        run = json.loads(path.read_text())
        curve = run["report"]["loss_curve"]
        traces = [c["trace"] for c in curve if "trace" in c]
        rows.append(
            {
                "attack": run["attack"],
                "name": run["setting"],
                "overrides": run["overrides"],
                "acc": run["after"]["acc"],
                "asr": run["after"]["asr"],
                "acc_before": run["before"]["acc"],
                "asr_before": run["before"]["asr"],
                "git_revision": run.get("git_revision"),
                "date": run.get("date"),
                "trace0": run["report"]["extra"].get("trace0"),
                "trace_first": traces[0] if traces else None,
                "trace_last": traces[-1] if traces else None,
                "trace_max": max(traces) if traces else None,
                "wall_time_s": run["report"]["wall_time_s"],
            }
        )
    lines = [
        "# FIP sensitivity (CIFAR-10, PreAct-ResNet-18 w16, 500 clean images)",
        "",
        "| attack | run | settings | ACC | ASR | Tr F: theta0 -> last (max) | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        trace = (
            "-"
            if r["trace_last"] is None
            else (f"{r['trace0']:.0f} -> {r['trace_last']:.0f} ({r['trace_max']:.0f})")
        )
        lines.append(
            f"| {r['attack']} | {r['name']} | {settings(r['overrides'])} | "
            f"{r['acc']:.4f} | {r['asr']:.4f} | {trace} | "
            f"{r['wall_time_s']:.0f} s |"
        )
    meta = provenance()
    revisions = sorted({r["git_revision"] for r in rows if r.get("git_revision")})
    dates = sorted(r["date"] for r in rows if r.get("date"))
    if dates:
        lines += [
            "",
            f"The runs were measured at {len(revisions)} revisions between {dates[0]} and "
            f"{dates[-1]} (each run's JSON in `fip_sensitivity_runs/` holds its command, "
            "revision, machine and date); FIP's code has changed since, so they are not "
            "necessarily what this revision gives.",
        ]
    lines += [
        "",
        f"Table written by `{meta['command']}` at {meta['git_revision']} on {meta['machine']}, "
        f"{meta['date']}.",
    ]
    (RESULTS / "fip_sensitivity.json").write_text(json.dumps({"rows": rows, **meta}, indent=1))
    (RESULTS / "fip_sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "fip_sensitivity.py")
