"""Are the zoo's backdoored minima sharper than the clean model's, and does FIP flatten them?

    python experiments/sharpness_zoo.py                       # clean + the six core attacks
    python experiments/sharpness_zoo.py --after-fip           # and each after FIP
    python experiments/sharpness_zoo.py --report-only         # tables from the stored runs
    python experiments/sharpness_zoo.py --entries --checkpoint clean_seed1=PATH  # outside the zoo

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

``--after-fip`` adds the same measurements of each model after FIP with the benchmark's headline
setting (``midway_averaged_transfer``, seed 0, on the whole D_v), with its test ACC / ASR after
the fact. The clean model's is a control: how far FIP flattens a model with no backdoor. Every
measurement is stored under ``experiments/results/sharpness_zoo/`` as it finishes (a killed run
resumes), and the tables go to ``experiments/results/sharpness_zoo.{json,md}`` with command,
revision, machine and date.

``--checkpoint NAME=PATH`` measures a model outside the zoo the same way, under the name NAME.
It must hold the zoo's D_v (the same clean-set indices). Its use here: clean models trained with
other training seeds (``fippure train ... --seed 1``), which set the spread between training runs
that a backdoored model's curvature must exceed before it says anything about the backdoor. Their
checkpoints are too large for the zoo; each one's training report is copied to
``experiments/results/sharpness_zoo/training/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import math
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
TRAINING = RUNS / "training"
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


def check_stored(path: pathlib.Path, expected: dict) -> None:
    """Stops the script (one line) where a stored measurement disagrees with ``expected`` (the
    analysis settings, the checkpoint, FIP's overrides): it would be skipped as done."""
    from trigger_synthesis_check import stored_mismatch

    mismatch = stored_mismatch(json.loads(path.read_text()), expected)
    if mismatch is not None:
        raise SystemExit(
            f"sharpness_zoo: {path} was measured with {mismatch}; move it away to measure again"
        )


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
                check_stored(path, {"analysis_config": ANALYSIS, **(extra or {})})
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
                "clean_model": backdoored.attack is None,
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

    kinds = KINDS if backdoored.attack is not None else ("clean",)
    overrides = overrides_for("fip", FIP_SETTING)
    paths = [run_path(entry, "after_fip", kind, b) for kind in kinds for b in range(BATCHES)]
    for path in (p for p in paths if p.exists()):
        check_stored(path, {"setting": FIP_SETTING, "overrides": overrides})
    if all(path.exists() for path in paths):
        return
    config = make_config("fip", overrides)
    purified, _ = get_defense("fip").purify(
        backdoored.model, backdoored.variables, backdoored.clean, config, jax.random.key(0)
    )
    metrics = evaluate(backdoored, purified)
    print(f"{entry} after FIP: test ACC {metrics['acc']:.4f} / ASR {metrics['asr']}")
    extra = {
        "defense": "fip",
        "setting": FIP_SETTING,
        "overrides": overrides,
        "seed": 0,
        "test_after_the_fact": metrics,
    }
    measure(entry, "after_fip", backdoored, purified, extra)


def measure_checkpoint(name: str, path: pathlib.Path) -> None:
    """Measures a checkpoint outside the zoo under ``name``; it must hold the zoo's D_v."""
    import shutil

    from fippure.zoo import load_backdoored

    backdoored = load_backdoored(path)
    zoo_clean = json.loads((ZOO / "clean" / "metadata.json").read_text())["clean_indices"]
    if list(backdoored.checkpoint.metadata["clean_indices"]) != list(zoo_clean):
        raise SystemExit(
            f"sharpness_zoo: {path} holds another clean set than the zoo's D_v, so its "
            "curvature would be measured on other images"
        )
    for stored in RUNS.glob(f"{name}__before__*.json"):
        # before the training report is copied: another checkpoint's rows under this name
        # would be kept beside its report
        check_stored(stored, {"checkpoint": str(path)})
    trained = {}
    report = path / "report.json"
    if report.exists():
        TRAINING.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report, TRAINING / f"{name}.json")
        r = json.loads(report.read_text())
        trained = {
            "test_accuracy": r.get("test_accuracy"),
            "train_seed": r.get("train_config", {}).get("seed"),
            "trained_by": r.get("command"),
            "trained_at": r.get("git_revision"),
        }
    measure(name, "before", backdoored, backdoored.variables, {"checkpoint": str(path), **trained})


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


def clean_models(rows: list[dict]) -> list[str]:
    """The entries that are clean (benign) models: the zoo's ``clean`` and any checkpoint
    measured with ``--checkpoint`` that carries no attack; the zoo's first, the rest by name."""
    names = [r["entry"] for r in rows if r["entry"] == "clean" or r.get("clean_model")]
    return sorted(dict.fromkeys(names), key=lambda e: (e != "clean", e))


def rank_sum_p(low: list[float], high: list[float]) -> float:
    """Exact one-sided p-value of the rank-sum (Mann-Whitney U) test that ``low`` lies below
    ``high`` (continuous values, so no ties)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(low, high, alternative="less", method="exact").pvalue)


def lambda_max_per_batch(cells: dict, entry: str, state: str, kind: str) -> list[float] | None:
    """``entry``'s lambda_max on each batch, or None unless every batch was measured."""
    cell = cells.get((entry, state, kind))
    if cell is None or len(cell["batches"]) < BATCHES:
        return None
    return [cell["batches"][b]["lambda_max"] for b in range(BATCHES)]


def findings(cells: dict, entries: list[str], clean: list[str] | None = None) -> list[str]:
    """The comparisons the table supports, as bullet lines."""

    out = []
    clean = clean or ["clean"]
    reference = lambda_max_per_batch(cells, "clean", "before", "clean")
    attacked = [e for e in entries if e not in clean]
    if reference:
        ratios = {}
        for e in attacked:
            values = lambda_max_per_batch(cells, e, "before", "clean")
            if values:
                ratios[e] = [v / r for v, r in zip(values, reference, strict=True)]
        if ratios:
            flat = [x for r in ratios.values() for x in r]
            out.append(
                "- Clean images, same batch (paired): the zoo's clean model's lambda_max is "
                + " and ".join(f"{v:.0f}" for v in reference)
                + f" on the two batches; a backdoored model's is {min(flat):.2f}x to "
                f"{max(flat):.2f}x of it on the same batch ("
                + "; ".join(f"{e} " + " / ".join(f"{x:.2f}x" for x in r) for e, r in ratios.items())
                + ")."
            )
    spread = {e: lambda_max_per_batch(cells, e, "before", "clean") for e in clean}
    spread = {e: v for e, v in spread.items() if v}
    if len(spread) > 1:
        out += clean_spread_lines(cells, spread, attacked)
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
    control = cells.get(("clean", "before", "clean")), cells.get(("clean", "after_fip", "clean"))
    if all(control):
        before, after = control
        out.append(
            "- Control: the same FIP run on the zoo's clean model (no backdoor) takes lambda_max "
            f"{before['lambda_max']:.0f} -> {after['lambda_max']:.0f} "
            f"({after['lambda_max'] / before['lambda_max'] - 1:+.0%}), Tr(H) "
            f"{before['trace_hessian']:.0f} -> {after['trace_hessian']:.0f} "
            f"({after['trace_hessian'] / before['trace_hessian'] - 1:+.0%}) and Tr(F) "
            f"{before['trace_empirical_fisher']:.0f} -> {after['trace_empirical_fisher']:.0f} "
            f"({after['trace_empirical_fisher'] / before['trace_empirical_fisher'] - 1:+.0%})."
        )
    if any(state == "after_fip" and kind == "triggered" for _, state, kind in cells):
        out.append(
            "- After FIP the triggered images' loss (on the target label) is far from a minimum, "
            "so their curvature there is not that of a minimum; it is listed for completeness."
        )
    if reference and len(spread) < 2:
        out.append(
            "- There is one clean model (one training run), so the comparison cannot tell a "
            "backdoor's effect from the spread between training runs."
        )
    return out


def clean_spread_lines(cells: dict, spread: dict, attacked: list[str]) -> list[str]:
    """How the backdoored models sit against the spread of several clean training runs."""
    lows = [min(v[b] for v in spread.values()) for b in range(BATCHES)]
    highs = [max(v[b] for v in spread.values()) for b in range(BATCHES)]
    means = {e: statistics.mean(v) for e, v in spread.items()}
    grand = statistics.mean(means.values())
    out = [
        f"- Clean models ({len(spread)} training runs on the same data and D_v: "
        + ", ".join(spread)
        + "): lambda_max "
        + "; ".join(
            f"batch {b}: " + " / ".join(f"{v[b]:.0f}" for v in spread.values())
            for b in range(BATCHES)
        )
        + "; per-model means "
        + " / ".join(f"{m:.0f}" for m in means.values())
        + f" (range {min(means.values()):.0f}-{max(means.values()):.0f})."
    ]
    above_both, above_mean, counted, bd_means = [], [], 0, []
    for e in attacked:
        values = lambda_max_per_batch(cells, e, "before", "clean")
        if not values:
            continue
        counted += 1
        bd_means.append(statistics.mean(values))
        if all(v > h for v, h in zip(values, highs, strict=True)):
            above_both.append(e)
        if statistics.mean(values) > max(means.values()):
            above_mean.append(e)
    if counted:
        out.append(
            f"- Against that spread: {len(above_both)} of {counted} backdoored models have a "
            "higher lambda_max than every clean model on both batches"
            + (f" ({', '.join(above_both)})" if above_both else "")
            + f"; {len(above_mean)} of {counted} have a higher mean than the sharpest clean "
            "model's"
            + (f" ({', '.join(above_mean)})" if above_mean else "")
            + f". The clean models span {lows[0]:.0f}-{highs[0]:.0f} on batch 0 and "
            f"{lows[1]:.0f}-{highs[1]:.0f} on batch 1. The backdoored models' means are "
            f"{min(bd_means) / grand:.2f}x to {max(bd_means) / grand:.2f}x the clean models' "
            f"mean ({grand:.0f}; median {statistics.median(bd_means) / grand:.2f}x). "
            f"Exact one-sided rank-sum test that the clean models' means lie below the "
            f"backdoored models': p = {rank_sum_p(list(means.values()), bd_means):.3f} (the "
            "backdoored models are single runs of different attacks, and the smallest p that "
            f"{len(means)} clean models allow is "
            f"{1 / math.comb(len(means) + counted, len(means)):.4f})."
        )
        for key, label, digits in (
            ("trace_hessian", "Tr(H)", 0),
            ("trace_empirical_fisher", "Tr(F)", 0),
            ("loss", "The loss", 3),
        ):
            clean_values = [cells[(e, "before", "clean")][key] for e in spread]
            bd = [
                cells[(e, "before", "clean")][key]
                for e in attacked
                if (e, "before", "clean") in cells
            ]
            inside = sum(min(clean_values) <= v <= max(clean_values) for v in bd)
            out.append(
                f"- {label} on clean images, mean of the two batches: clean models "
                f"{min(clean_values):.{digits}f}-{max(clean_values):.{digits}f}; backdoored "
                f"models {min(bd):.{digits}f}-{max(bd):.{digits}f} (median "
                f"{statistics.median(bd):.{digits}f}), {inside} of {len(bd)} inside the clean "
                "range, "
                f"{sum(v > max(clean_values) for v in bd)} above it and "
                f"{sum(v < min(clean_values) for v in bd)} below it."
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
            first = next(iter((c or t)["batches"].values()))
            if first.get("checkpoint") and first.get("test_accuracy") is not None:
                test = f"{first['test_accuracy']:.3f} / -"
            if state == "after_fip":
                m = first.get("test_after_the_fact")
                if m:
                    asr = "-" if m["asr"] is None else f"{m['asr']:.3f}"
                    test = f"{m['acc']:.3f} / {asr}"
            label = "before" if state == "before" else "after FIP"
            lines.append(
                f"| {entry} | {label} | {lam(c)} | {fmt(c, 'trace_hessian')} | "
                f"{fmt(c, 'trace_empirical_fisher')} | {fmt(c, 'loss', 3)} | {lam(t)} | "
                f"{fmt(t, 'trace_hessian')} | {fmt(t, 'trace_empirical_fisher')} | "
                f"{fmt(t, 'loss', 3)} | {test} |"
            )
    lines += [""]
    outside = {r["entry"]: r for r in rows if r.get("checkpoint") and r["entry"] in entries}
    if outside:
        lines += [
            "Not in the zoo (measured with `--checkpoint`; their test ACC is the training "
            "report's): "
            + "; ".join(
                f"{e}: `{r['checkpoint']}`, training seed {r.get('train_seed')}, "
                f"`{r.get('trained_by')}`"
                for e, r in outside.items()
            )
            + ". Their training reports are in `experiments/results/sharpness_zoo/training/`.",
            "",
        ]
    lines += findings(cells, entries, clean_models(rows))
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


def stored_entries(rows: list[dict]) -> list[str]:
    """Every entry measured so far: the clean models, the core six, then the rest by name."""
    stored = {r["entry"] for r in rows}
    entries = [e for e in clean_models(rows) if e in stored]
    entries += [e for e in CORE_ATTACKS if e in stored]
    return entries + sorted(stored - set(entries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entries",
        nargs="*",
        default=None,
        help="zoo entries to measure (default: clean and the core six; none: only the "
        "--checkpoint models); with --report-only, the entries to tabulate (default: all)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also measure this checkpoint outside the zoo under NAME (it must hold the zoo's "
        "D_v), e.g. a clean model trained with another seed; repeatable",
    )
    parser.add_argument("--after-fip", action="store_true", help="also measure after FIP")
    parser.add_argument("--report-only", action="store_true", help="tables from stored runs")
    args = parser.parse_args()
    known = sorted(p.name for p in ZOO.iterdir() if (p / "metadata.json").exists())
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"sharpness_zoo: --checkpoint takes NAME=PATH, got {item!r}")
        if name in known:
            raise SystemExit(f"sharpness_zoo: --checkpoint name {name!r} is a zoo entry's")
        if not pathlib.Path(path, "metadata.json").exists():
            raise SystemExit(f"sharpness_zoo: {path} is not a checkpoint directory")
        checkpoints[name] = pathlib.Path(path)
    entries = ["clean", *CORE_ATTACKS] if args.entries is None else list(args.entries)
    rows = load_rows()
    outside = {r["entry"] for r in rows if r.get("checkpoint")}
    unknown = sorted(set(entries) - set(known) - (outside if args.report_only else set()))
    if unknown:
        raise SystemExit(f"sharpness_zoo: unknown zoo entries {unknown}; known: {known}")
    if args.report_only:
        write_report(rows, entries if args.entries else stored_entries(rows))
        return
    from fippure.zoo import load_backdoored

    for name, path in checkpoints.items():
        measure_checkpoint(name, path)
    for entry in entries:  # each entry (and its data) is loaded once
        backdoored = load_backdoored(ZOO / entry)
        measure(entry, "before", backdoored, backdoored.variables)
        if args.after_fip:
            after_fip(entry, backdoored)  # on the clean model: a control
    rows = load_rows()  # the report covers every stored measurement
    write_report(rows, stored_entries(rows))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "sharpness_zoo")
