"""One configuration per method chosen on D_v alone, among candidates, under the clean-set stop.

The benchmark's settings (learning rate, eta_F, ...) were chosen after test-split probes
(README, "Protocol caveat"); only their stop was later chosen on D_v (``clean_set_stop.py``).
This script makes the rest of the choice as a defender can. Every candidate runs under the
library's clean-set stop (:func:`fippure.purify.purify_with_clean_stop`, the scored iterate
kept, the search ending at the first check under the threshold) on D_v's 400-image fit part,
with the Neural Cleanse suspect of ``trigger_synthesis_check.py``, on every core attack. A
candidate scores, per attack, a validation success when its chosen check reached the
threshold with a validation ACC at most ``--max-val-drop`` below the undefended model's on
the same 100-image slice. The candidate with the most validation successes wins; ties go to
the higher mean validation ACC at the chosen checks, then to the earlier candidate. Only D_v
enters the choice. The test metrics of every candidate are reported beside it after the fact.

    python experiments/clean_set_selection.py [--method fip] [--attacks badnets ...]
        [--report-only]

``--attacks`` names the attacks to run now; the choice and the report always cover the six
core attacks (a candidate missing one of them is not eligible).

runs (resumably: each attack's result is saved as it finishes, under
``clean_set_stop/<method>_<setting>[_<key><value>]_scored/``) and writes
``experiments/results/clean_set_selection_<method>.{json,md}``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import clean_set_stop  # noqa: E402
import trigger_synthesis_check as scans  # noqa: E402
from purify_benchmark import CORE_ATTACKS  # noqa: E402

#: (setting of purify_benchmark.METHODS, overrides) per method, in order of preference for a
#: tie. FIP: the anchor-and-trace family at lr 0.001 (brief_transfer, eta_F 2), with the
#: penalty halved and doubled, and at twice the rate; then the anchor doubled at eta_F 4, and
#: the benchmark's midway_averaged_transfer (eta_F 2.5, eta_r 10, four trace probes). NFT: its
#: two 150-step settings, with and without the crop + flip before MixUp.
CANDIDATES: dict[str, list[tuple[str, dict[str, str]]]] = {
    "fip": [
        ("brief_transfer", {}),
        ("brief_transfer", {"eta_F": "1"}),
        ("brief_transfer", {"eta_F": "4"}),
        ("brief_transfer", {"learning_rate": "0.002"}),
        # added after the four above had been scored on test (LISTED_BEFORE_TEST_READ)
        ("anchored_transfer", {"eta_F": "4"}),
        ("midway_averaged_transfer", {}),
    ],
    "nft": [
        ("brief_transfer", {}),
        ("brief_unaugmented", {}),
    ],
}
#: Per method, how many of its first candidates were run before any test column of this
#: report was read. Later ones were added afterwards, so the candidate list itself is not
#: held out, though the choice among the candidates still reads D_v only.
LISTED_BEFORE_TEST_READ = {"fip": 4, "nft": 2}
#: The search's settings, as in clean_set_stop.py's runs of each method (NFT's searched up to
#: 300 steps, over which its learning-rate blocks then span).
MAX_STEPS = {"fip": 150, "nft": 300}
EVERY, THRESHOLD, SEED = 10, 0.05, 0


def validation_success(result: dict, max_val_drop: float) -> bool:
    """Whether the D_v rule would call this run a success: the chosen check reached the
    threshold, within ``max_val_drop`` of the undefended validation ACC. Reads D_v only."""
    drop = (
        result["undefended_validation_acc"] - clean_set_stop.chosen_check(result)["validation_acc"]
    )
    return bool(result["reached_threshold"]) and drop <= max_val_drop + 1e-9


def test_success(result: dict, acc_drop: float = 0.03, asr_max: float = 0.05) -> bool:
    """Issue 5's target on the test split (never read by the choice)."""
    c, b = result["chosen_test"], result["before_test"]
    return c["asr"] <= asr_max and b["acc"] - c["acc"] <= acc_drop


def score(results: list[dict], max_val_drop: float) -> dict:
    """A candidate's D_v score and, separately, its test outcome."""
    chosen = [clean_set_stop.chosen_check(r) for r in results]
    return {
        "validation_successes": sum(validation_success(r, max_val_drop) for r in results),
        "mean_validation_acc": float(np.mean([c["validation_acc"] for c in chosen])),
        "test_successes": sum(test_success(r) for r in results),
        "attacks": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fip", choices=sorted(CANDIDATES))
    parser.add_argument("--attacks", nargs="*", default=list(CORE_ATTACKS))
    parser.add_argument(
        "--max-val-drop",
        type=float,
        default=0.03,
        help="a validation success keeps validation ACC within this of the undefended model's "
        "(issue 5's test-split bound, applied to D_v)",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    rows = []
    for setting, overrides in CANDIDATES[args.method]:

        def run(attack: str, setting=setting, overrides=overrides) -> dict:
            return clean_set_stop.run_attack(
                attack, MAX_STEPS[args.method], EVERY, THRESHOLD, SEED, args.method, setting,
                rerun=False, overrides=overrides,
            )  # fmt: skip

        out = clean_set_stop.result_directory(args.method, setting, SEED, False, overrides)
        scans.per_attack(args.attacks, out, run, args.report_only)
        # the choice is made over the core attacks whatever --attacks ran now, so a run on
        # some of them does not rewrite the report as a choice over those alone
        results = scans.stored_results(CORE_ATTACKS, out)
        search = {"max_steps": MAX_STEPS[args.method], "every": EVERY, "threshold": THRESHOLD}
        other = [r["attack"] for r in results if {k: r["rule"][k] for k in search} != search]
        if other:
            sys.exit(
                f"clean_set_selection: {out} holds searches with settings other than {search} "
                f"({', '.join(other)}); move them aside"
            )
        if results:
            rows.append({"setting": setting, "overrides": overrides, "results": results,
                         **score(results, args.max_val_drop)})  # fmt: skip
    complete = [r for r in rows if r["attacks"] == len(CORE_ATTACKS)]
    chosen = (
        max(
            complete,
            key=lambda r: (r["validation_successes"], r["mean_validation_acc"], -complete.index(r)),
        )  # fmt: skip
        if complete
        else None
    )
    write_summary(args, rows, chosen)


def write_summary(args, rows: list[dict], chosen: dict | None) -> None:
    label = lambda row: clean_set_stop.variant_label(  # noqa: E731
        {"method": args.method, "setting": row["setting"], "overrides": row["overrides"],
         "rerun": True}
    )  # fmt: skip
    lines = [
        f"# {args.method.upper()}'s configuration chosen on D_v (CIFAR-10, PreAct-ResNet-18 w16)",
        "",
        f"Every candidate runs under the clean-set stop (checks every {EVERY} steps up to "
        f"{MAX_STEPS[args.method]}, threshold {THRESHOLD}, the scored iterate kept, seed "
        f"{SEED}) on 400 of D_v's 500 images, scored with the Neural Cleanse suspect on the "
        "100-image validation slice. A validation success: the threshold reached within "
        f"{args.max_val_drop} of the undefended validation ACC. The most validation successes "
        "win, then the higher mean validation ACC at the chosen checks. The test columns were "
        "not read by the choice. Test success: ASR <= 0.05 and ACC drop <= 0.03.",
    ]
    listed = LISTED_BEFORE_TEST_READ[args.method]
    if len(rows) > listed:
        lines += [
            "",
            f"The first {listed} candidates were listed before any test column here was read; "
            "the rest were added after those columns had been read, so the candidate list is "
            "not held out. The choice among all of them still reads D_v only.",
        ]
    lines += clean_set_stop.chosen_on_test_lines([(args.method, row["setting"]) for row in rows])
    lines += [
        "",
        "| candidate | validation successes | mean val. ACC at the stops | test successes | "
        "chosen |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {label(row)} | {row['validation_successes']} of {row['attacks']} | "
            f"{row['mean_validation_acc']:.3f} | {row['test_successes']} of {row['attacks']} | "
            f"{'**yes**' if row is chosen else ''}"
            f"{'' if row['attacks'] == len(CORE_ATTACKS) else 'incomplete: not eligible'} |"
        )
    if chosen is None:
        lines += ["", "No candidate has a result for every attack yet: nothing is chosen."]
    lines += [
        "",
        "## Every run (validation: what the choice read; test: after the fact)",
        "",
        "| candidate | attack | stop | val. synth. ASR / ACC (undefended ACC) | val. success | "
        "test ACC / ASR | test success |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["results"]:
            at = clean_set_stop.chosen_check(r)
            t = r["chosen_test"]
            lines.append(
                f"| {label(row)} | {r['attack']} | {r['chosen_step']}"
                f"{'' if r['reached_threshold'] else ' (not reached)'} | "
                f"{at['validation_synth_asr']:.3f} / {at['validation_acc']:.2f} "
                f"({r['undefended_validation_acc']:.2f}) | "
                f"{'yes' if validation_success(r, args.max_val_drop) else 'no'} | "
                f"{t['acc']:.3f} / {t['asr']:.3f} | {'yes' if test_success(r) else 'no'} |"
            )
    results = [r for row in rows for r in row["results"]]
    summary = ROOT / "experiments" / "results" / f"clean_set_selection_{args.method}"
    scans.write_report(summary, lines, results, clean_set_stop.variant_label)


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "clean_set_selection.py")
