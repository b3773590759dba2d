"""Are the zoo's backdoored minima sharper than the clean model's, and does FIP flatten them?

    python experiments/sharpness_zoo.py                       # clean + the six core attacks
    python experiments/sharpness_zoo.py --after-fip           # and each after FIP
    python experiments/sharpness_zoo.py --report-only         # tables from the stored runs

FIP starts from the observation that a backdoored model sits in a sharper minimum than a benign
one (Karim et al., 2024, section 3: lambda_max about 570 against about 20; SPEC section 2) and
penalises the Fisher trace to reach a flatter one. This measures that premise on the zoo
(CIFAR-10, PreAct-ResNet-18 width 16). For every model it reports, with the model in eval
mode and the loss the mean cross-entropy of one batch (:func:`fippure.curvature.analysis.
analyze_curvature`, SPEC section 8), ``lambda_max``, ``Tr(H)`` and the exact ``Tr(F)`` on

- ``clean``: 200 clean images of the defender's set D_v (the same images for every model: the
  zoo shares one D_v) with their labels, in two disjoint batches (images 0-199 and 200-399), so
  the spread between batches shows what a difference between models must exceed;
- ``triggered``: D_v's images of the other classes (every image for an all-to-all attack), as
  for ASR, triggered with the entry's stored attack and given the attack's target labels: the
  curvature of the backdoor task. The first 400 of them, in two batches of 200.

``--after-fip`` adds the same measurements of each backdoored model after FIP with the
benchmark's headline setting (``midway_averaged_transfer``, seed 0, on the whole D_v), with its
test ACC / ASR after the fact. Every measurement is stored under
``experiments/results/sharpness_zoo/`` as it finishes (a killed run resumes), and the tables go to
``experiments/results/sharpness_zoo.{json,md}`` with command, revision, machine and date.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from purify_benchmark import CORE_ATTACKS, overrides_for  # noqa: E402
from trigger_synthesis_check import provenance_lines  # noqa: E402

ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
RESULTS = ROOT / "experiments" / "results"
RUNS = RESULTS / "sharpness_zoo"
BATCH = 200
BATCHES = 2
FIP_SETTING = "midway_averaged_transfer"
KINDS = ("clean", "triggered")
#: Lighter than ``fippure analyze``'s defaults (one SLQ probe; power iteration to 1e-3): about
#: 60 Hessian-vector products a batch. The Lanczos top eigenvalue cross-checks lambda_max.
ANALYSIS = {
    "hutchinson_probes": 8,
    "probe_chunk": 2,
    "power_iters": 40,
    "power_tol": 1e-3,
    "lanczos_iters": 20,
    "slq_probes": 1,
    "top_k": 3,
}
KEPT = (
    "num_images", "loss", "batch_accuracy", "lambda_max", "lambda_max_power_iters",
    "lambda_max_lanczos", "trace_hessian", "trace_hessian_stderr", "trace_empirical_fisher",
    "trace_ggn", "top_eigenvalues", "timings_s",
)  # fmt: skip


SUMMARISED = ("lambda_max", "trace_hessian", "trace_empirical_fisher", "loss", "batch_accuracy")


def run_path(entry: str, state: str, kind: str, batch: int) -> pathlib.Path:
    return RUNS / f"{entry}__{state}__{kind}__{batch}.json"


def batches(backdoored, kind: str):
    """``[(images in [0, 1] or uint8, labels)]``, one per batch, for ``kind``."""
    from fippure.attacks import triggered_test_set

    if kind == "clean":
        images, labels = backdoored.clean.images, backdoored.clean.labels
    else:
        meta = backdoored.checkpoint.metadata["attack"]
        triggered = triggered_test_set(
            backdoored.attack,
            backdoored.attack_state,
            backdoored.clean,
            target=backdoored.target,
            mode=backdoored.mode,
            seed=meta.get("seed", 0),
        )
        images, labels = triggered.images, triggered.target_labels
    if len(labels) < BATCH * BATCHES:
        raise SystemExit(f"sharpness_zoo: only {len(labels)} {kind} images, need {BATCH * BATCHES}")
    return [
        (images[b * BATCH : (b + 1) * BATCH], labels[b * BATCH : (b + 1) * BATCH])
        for b in range(BATCHES)
    ]


def measure(entry: str, state: str, backdoored, variables, extra: dict | None = None) -> None:
    """Stores the curvature of ``variables`` on every batch of every kind not yet measured."""
    import jax
    import jax.numpy as jnp

    from fippure.curvature.analysis import AnalysisConfig, analyze_curvature
    from fippure.data import normalize, to_unit_range
    from fippure.provenance import provenance

    config = AnalysisConfig(**ANALYSIS)
    kinds = KINDS if backdoored.attack is not None else ("clean",)
    for kind in kinds:
        for b, (images, labels) in enumerate(batches(backdoored, kind)):
            path = run_path(entry, state, kind, b)
            if path.exists():
                continue
            inputs = normalize(to_unit_range(jnp.asarray(images)), backdoored.spec)
            report, _ = analyze_curvature(
                backdoored.model, variables, inputs, jnp.asarray(labels), jax.random.key(1), config
            )
            row = {
                "entry": entry,
                "state": state,
                "kind": kind,
                "batch": b,
                "images": f"{kind} D_v images {b * BATCH}-{(b + 1) * BATCH - 1}",
                **{k: report[k] for k in KEPT},
                "analysis_config": report["config"],
                **(extra or {}),
                **provenance(),
            }
            RUNS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=1))
            print(
                f"{entry} {state} {kind} {b}: lambda_max {row['lambda_max']:.1f} "
                f"(Lanczos {row['lambda_max_lanczos']:.1f}), Tr(H) {row['trace_hessian']:.0f}, "
                f"Tr(F) {row['trace_empirical_fisher']:.0f}, loss {row['loss']:.3f}",
                flush=True,
            )


def after_fip(entry: str, backdoored) -> None:
    """FIP's headline setting (seed 0) on ``entry``, then its curvature."""
    import jax

    from fippure.purify.registry import get_defense, make_config
    from fippure.purify.runner import evaluate

    if all(
        run_path(entry, "after_fip", kind, b).exists() for kind in KINDS for b in range(BATCHES)
    ):
        return
    overrides = overrides_for("fip", FIP_SETTING)
    config = make_config("fip", overrides)
    purified, _ = get_defense("fip").purify(
        backdoored.model, backdoored.variables, backdoored.clean, config, jax.random.key(0)
    )
    metrics = evaluate(backdoored, purified)
    print(f"{entry} after FIP: test ACC {metrics['acc']:.4f} / ASR {metrics['asr']:.4f}")
    extra = {
        "defense": "fip",
        "setting": FIP_SETTING,
        "overrides": overrides,
        "seed": 0,
        "test_after_the_fact": metrics,
    }
    measure(entry, "after_fip", backdoored, purified, extra)


def load_rows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def summarise(rows: list[dict]) -> dict:
    """Per (entry, state, kind): the per-batch values and their mean."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        cell = cells.setdefault((r["entry"], r["state"], r["kind"]), {"batches": {}})
        cell["batches"][r["batch"]] = r
    for cell in cells.values():
        group = list(cell["batches"].values())
        for k in SUMMARISED:
            cell[k] = statistics.mean(r[k] for r in group)
        cell["lambda_max_range"] = (
            min(r["lambda_max"] for r in group),
            max(r["lambda_max"] for r in group),
        )
    return cells


def findings(cells: dict, entries: list[str]) -> list[str]:
    """The comparisons the table supports, as bullet lines."""

    def per_batch(entry, state, kind):
        cell = cells.get((entry, state, kind))
        if cell is None or len(cell["batches"]) < BATCHES:
            return None
        return [cell["batches"][b]["lambda_max"] for b in range(BATCHES)]

    out = []
    reference = per_batch("clean", "before", "clean")
    attacked = [e for e in entries if e != "clean"]
    if reference:
        ratios = {}
        for e in attacked:
            values = per_batch(e, "before", "clean")
            if values:
                ratios[e] = [v / r for v, r in zip(values, reference, strict=True)]
        if ratios:
            flat = [x for r in ratios.values() for x in r]
            out.append(
                "- Clean images, same batch (paired): the clean model's lambda_max is "
                + " and ".join(f"{v:.0f}" for v in reference)
                + f" on the two batches; a backdoored model's is {min(flat):.2f}x to "
                f"{max(flat):.2f}x of it on the same batch ("
                + "; ".join(f"{e} " + " / ".join(f"{x:.2f}x" for x in r) for e, r in ratios.items())
                + ")."
            )
    triggered = {
        e: cells[(e, "before", "triggered")]["lambda_max"]
        for e in attacked
        if (e, "before", "triggered") in cells
    }
    if triggered:
        ranked = sorted(triggered.items(), key=lambda kv: -kv[1])
        out.append(
            "- Triggered images (the backdoor task), mean lambda_max, highest first: "
            + ", ".join(f"{e} {v:.0f}" for e, v in ranked)
            + "."
        )
    moved = []
    for e in attacked:
        before, after = cells.get((e, "before", "clean")), cells.get((e, "after_fip", "clean"))
        if before and after:
            moved.append(
                f"{e} {before['lambda_max']:.0f} -> {after['lambda_max']:.0f} "
                f"(Tr(H) {before['trace_hessian']:.0f} -> {after['trace_hessian']:.0f})"
            )
    if moved:
        out.append(
            "- FIP on clean images, mean lambda_max before -> after: " + "; ".join(moved) + "."
        )
    if any(state == "after_fip" and kind == "triggered" for _, state, kind in cells):
        out.append(
            "- After FIP the triggered images' loss (on the target label) is far from a minimum, "
            "so their curvature there is not that of a minimum; it is listed for completeness."
        )
    if reference:
        out.append(
            "- There is one clean model (one training run), so the comparison cannot tell a "
            "backdoor's effect from the spread between training runs."
        )
    return out


def write_report(rows: list[dict], entries: list[str]) -> None:
    from fippure.provenance import provenance

    cells = summarise(rows)

    def fmt(cell, key, digits=0):
        return "-" if cell is None else f"{cell[key]:.{digits}f}"

    def lam(cell):
        if cell is None:
            return "-"
        lo, hi = cell["lambda_max_range"]
        return f"{cell['lambda_max']:.0f} ({lo:.0f}-{hi:.0f})"

    lines = [
        "# Sharpness of the zoo's minima (CIFAR-10, PreAct-ResNet-18 width 16)",
        "",
        "Eval-mode mean cross-entropy of one batch of 200 images, curvature with respect to "
        "every weight (`analyze_curvature`, SPEC section 8). Each cell is the mean over two "
        "disjoint batches of D_v (images 0-199 and 200-399); `lambda_max` gives the two "
        "batches' values in brackets. `clean`: D_v images with their labels (what a defense "
        "sees). `triggered`: the first 400 D_v images of the other classes (all classes for "
        "an all-to-all attack), triggered, with the target label (the backdoor task), in two "
        "batches of 200. After FIP: `fip midway_averaged_transfer`, seed 0, on the "
        "whole D_v; test ACC / ASR after the fact. The paper reports lambda_max of about 570 "
        "for a backdoored model against about 20 for a benign one (full-width PreAct-ResNet-18).",
        "",
        "| model | state | clean: lambda_max | clean: Tr(H) | clean: Tr(F) | clean: loss | "
        "triggered: lambda_max | triggered: Tr(H) | triggered: Tr(F) | triggered: loss | "
        "test ACC / ASR |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        for state in ("before", "after_fip"):
            c = cells.get((entry, state, "clean"))
            t = cells.get((entry, state, "triggered"))
            if c is None and t is None:
                continue
            test = "-"
            if state == "after_fip":
                first = next(iter((c or t)["batches"].values()))
                m = first.get("test_after_the_fact")
                test = f"{m['acc']:.3f} / {m['asr']:.3f}" if m else "-"
            label = "before" if state == "before" else "after FIP"
            lines.append(
                f"| {entry} | {label} | {lam(c)} | {fmt(c, 'trace_hessian')} | "
                f"{fmt(c, 'trace_empirical_fisher')} | {fmt(c, 'loss', 3)} | {lam(t)} | "
                f"{fmt(t, 'trace_hessian')} | {fmt(t, 'trace_empirical_fisher')} | "
                f"{fmt(t, 'loss', 3)} | {test} |"
            )
    lines += [""]
    lines += findings(cells, entries)
    meta = provenance()
    lines += [
        "",
        *provenance_lines(
            [{**r, "attack": r["entry"]} for r in rows],
            lambda r: "after FIP" if r["state"] == "after_fip" else "before",
        ),
        "",
        f"{len(rows)} measurements; each file in `experiments/results/sharpness_zoo/` holds its "
        "command, revision, machine and date.",
        "",
        f"Tables written by `{meta['command']}` at {meta['git_revision']}, {meta['date']}.",
    ]
    summary = {
        f"{e}__{s}__{k}": {key: v for key, v in cell.items() if key != "batches"}
        for (e, s, k), cell in cells.items()
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharpness_zoo.json").write_text(
        json.dumps({"cells": summary, "analysis": ANALYSIS, **meta}, indent=1)
    )
    (RESULTS / "sharpness_zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entries",
        nargs="*",
        default=None,
        help="zoo entries (default: clean and the core six; with --report-only, every entry "
        "measured)",
    )
    parser.add_argument("--after-fip", action="store_true", help="also measure after FIP")
    parser.add_argument("--report-only", action="store_true", help="tables from stored runs")
    args = parser.parse_args()
    known = sorted(p.name for p in ZOO.iterdir() if (p / "metadata.json").exists())
    entries = args.entries or ["clean", *CORE_ATTACKS]
    rows = load_rows()
    if args.report_only and not args.entries:  # every entry measured so far
        stored = {r["entry"] for r in rows}
        entries = [e for e in ["clean", *CORE_ATTACKS] if e in stored]
        entries += sorted(stored - set(entries))
    unknown = sorted(set(entries) - set(known))
    if unknown:
        raise SystemExit(f"sharpness_zoo: unknown zoo entries {unknown}; known: {known}")
    if not args.report_only:
        from fippure.zoo import load_backdoored

        for entry in entries:
            backdoored = load_backdoored(ZOO / entry)
            measure(entry, "before", backdoored, backdoored.variables)
        if args.after_fip:
            for entry in entries:
                if entry != "clean":
                    after_fip(entry, load_backdoored(ZOO / entry))
        rows = load_rows()
    write_report(rows, entries)


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "sharpness_zoo")
