"""A defense's stop chosen on D_v with a synthesized trigger, against the stop chosen on test data.

The benchmark's FIP settings stop at 50 steps, a count chosen after reading test-split results
(README, "Protocol caveat"). This script lets the defender choose the stop itself, as SPEC
section 1 allows: on D_v, with a trigger synthesized there. It runs the library's procedure,
:func:`fippure.purify.purify_with_clean_stop` (what ``fippure purify --stop-on-clean-set``
does), with the suspect trigger of ``trigger_synthesis_check.py``: Neural Cleanse on 400 of
D_v's 500 images, the other 100 being the validation slice.

1. The defense (default FIP ``brief_transfer``: lr 0.001, eta_F 2, trace BatchNorm in train
   mode, transferred statistics) runs for up to ``--max-steps`` on the 400 images. Every
   ``--every`` steps, and at the end, the iterate, finalised as a run of that many steps would
   be, is scored on the validation slice: the suspect trigger's ASR and the clean ACC.
2. The stop is the first check whose validation ASR is at most ``--threshold`` (among the checks
   within 0.05 of the undefended validation ACC), or the one with the lowest ASR if none is.
   Only D_v enters this choice.
3. The defense is run again with ``steps`` set to that stop and judged on the whole test split
   (with ``--scored-iterate``, the library's default, the iterate scored at the stop is judged
   instead; for a schedule that spans the run, NFT's or FT's, the two differ).

The test ACC / ASR of every checked iterate (first 2,000 test images) are recorded beside it
for the chart, after the fact; the rule never reads them. The library version reproduces the
seed-0 BadNets result of the script's earlier, hand-written loop exactly (every check, the stop
at 20 steps, test 0.8575 / 0.018); that loop made the seed-0 and seed-1 results.

    python experiments/clean_set_stop.py [--attacks badnets ...] [--seed N]
        [--method ft --setting brief_transfer] [--set eta_F=4 ...] [--scored-iterate]
        [--full-run] [--report-only]

writes ``experiments/results/clean_set_stop/[<method>_<setting>/][seed<N>/]<attack>.json`` and
``experiments/results/clean_set_stop.{json,md}``. The searches end at the first check under the
threshold (the library's default) unless ``--full-run`` is given; the runs made before that
default (session 33) all ran to ``--max-steps``, and their JSON has no ``halt_when_reached``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import trigger_synthesis_check as scans  # noqa: E402
from purify_benchmark import CORE_ATTACKS  # noqa: E402
from trigger_synthesis_check import INVERSION, VALIDATION_PER_CLASS, ZOO  # noqa: E402

SCANS = scans.OUT

OUT = ROOT / "experiments" / "results" / "clean_set_stop"
SUMMARY = ROOT / "experiments" / "results" / "clean_set_stop"
METHOD, SETTING = "fip", "brief_transfer"
#: Suffix of a result directory whose runs kept the scored iterate instead of re-running.
SCORED = "_scored"
#: Test images charted at every check (the final run is judged on all 10,000).
CHARTED = 2000


def suspect_trigger(attack: str, backdoored, fit):
    """The suspect trigger of the attack's scan (run here, and saved, if the scan is missing),
    and whether it was flagged."""
    import jax

    from fippure.purify.trigger_inversion import InversionConfig, scan_classes

    config = InversionConfig(**INVERSION)
    saved = SCANS / f"{attack}_triggers.npz"
    if saved.exists():
        scan = scans.load_scan(saved, backdoored.model, backdoored.variables, fit, config)
    else:
        scan = scan_classes(
            backdoored.model, backdoored.variables, fit, config, jax.random.key(0), progress=True
        )
        scans.save_scan(saved, scan)
    return scan.suspect, bool(scan.flagged)


def run_attack(
    attack: str,
    max_steps: int,
    every: int,
    threshold: float,
    seed: int = 0,
    method: str = METHOD,
    setting: str = SETTING,
    rerun: bool = True,
    overrides: dict[str, str] | None = None,
    halt: bool = True,
) -> dict:
    """The library's clean-set stop (:func:`fippure.purify.purify_with_clean_stop`) with the
    saved scan's suspect, plus the test metrics of every check for the chart. ``overrides``
    change the setting's configuration; ``halt`` is ``CleanStopConfig.halt_when_reached``."""
    import jax
    from purify_benchmark import overrides_for

    from fippure.data.splits import hold_out_per_class
    from fippure.purify.clean_stop import CleanStopConfig, purify_with_clean_stop
    from fippure.purify.registry import make_config
    from fippure.purify.runner import evaluate, upload_test_images
    from fippure.zoo import load_backdoored

    overrides = dict(overrides or {})
    backdoored = load_backdoored(ZOO / attack)
    fit_rows, _ = hold_out_per_class(backdoored.clean.labels, VALIDATION_PER_CLASS)
    trigger, flagged = suspect_trigger(attack, backdoored, backdoored.clean.subset(fit_rows))
    charted = dataclasses.replace(
        backdoored,
        test=backdoored.test.subset(np.arange(CHARTED)),
        triggered=backdoored.triggered.of_test_images(np.arange(CHARTED)),
    )
    charted_images = upload_test_images(charted)  # once, for all the checks
    charted_tests: dict[int, dict] = {}
    stop = CleanStopConfig(
        max_steps=max_steps,
        every=every,
        threshold=threshold,
        validation_per_class=VALIDATION_PER_CLASS,
        rerun=rerun,
        halt_when_reached=halt,
    )
    variables, report = purify_with_clean_stop(
        method,
        backdoored.model,
        backdoored.variables,
        backdoored.clean,
        make_config(method, {**overrides_for(method, setting, steps=max_steps), **overrides}),
        jax.random.key(seed),
        stop,
        trigger=trigger,
        observer=lambda step, v: charted_tests.__setitem__(
            step, evaluate(charted, v, charted_images)
        ),
    )
    summary = report.extra["clean_stop"]
    checks = [{**c, "charted_test": charted_tests[c["step"]]} for c in summary["checks"]]
    return {
        "attack": attack,
        "method": method,
        "setting": setting,
        "overrides": overrides,
        "target": backdoored.target,
        "suspect": trigger.target,
        "suspect_flagged": flagged,
        "seed": seed,
        "rerun": rerun,
        "rule": stop_rule(threshold, every, max_steps, halt),
        "undefended_validation_acc": summary["undefended_validation_acc"],
        "checks": checks,
        "chosen_step": summary["chosen_step"],
        "reached_threshold": summary["reached_threshold"],
        "chosen_test": evaluate(backdoored, variables),
        "before_test": evaluate(backdoored, backdoored.variables),
        "wall_time_s": report.wall_time_s,
    }


def stop_rule(threshold: float, every: int, max_steps: int, halt: bool) -> dict:
    """The stop rule a result records (``max_accuracy_drop``: :class:`CleanStopConfig`'s)."""
    from fippure.purify.clean_stop import CleanStopConfig

    return {
        "threshold": threshold,
        "every": every,
        "max_steps": max_steps,
        "max_accuracy_drop": CleanStopConfig().max_accuracy_drop,
        "halt_when_reached": halt,
    }


def chosen_check(result: dict) -> dict:
    """The check at a result's chosen stop."""
    return next(c for c in result["checks"] if c["step"] == result["chosen_step"])


def variant_name(setting: str, overrides: dict[str, str] | None = None) -> str:
    """``setting`` with its overrides appended (``brief_transfer_eta_F4``)."""
    return setting + "".join(f"_{k}{v}" for k, v in sorted((overrides or {}).items()))


def variant_label(result: dict) -> str:
    """A result's method, setting, overrides and iterate, for the tables."""
    overrides = result.get("overrides") or {}
    changed = f" ({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})"
    return (
        f"{result['method']} {result['setting']}{changed if overrides else ''}"
        f"{'' if result['rerun'] else ', scored iterate'}"
    )


def result_directory(
    method: str,
    setting: str,
    seed: int,
    rerun: bool = True,
    overrides: dict[str, str] | None = None,
) -> pathlib.Path:
    """Where a run's per-attack results live: ``OUT`` (and ``OUT/seed<N>``) for FIP
    ``brief_transfer`` with a rerun, ``OUT/<method>_<setting>[_<key><value>...]`` (and its
    ``seed<N>``) for another, with ``_scored`` appended where the scored iterate was kept (no
    rerun)."""
    setting = variant_name(setting, overrides)
    if (method, setting, rerun) == (METHOD, SETTING, True):
        base = OUT
    else:
        base = OUT / f"{method}_{setting}{'' if rerun else SCORED}"
    return base if seed == 0 else base / f"seed{seed}"


def collect_seeds(
    attacks: list[str], method: str = METHOD, setting: str = SETTING, rerun: bool = True
) -> list[dict]:
    """Every saved result of ``attacks`` for one method and setting, all seeds (results saved
    before the ``rerun`` field existed were all rerun)."""
    base = result_directory(method, setting, 0, rerun)
    results = []
    for directory in [base, *sorted(base.glob("seed*"))]:
        for attack in attacks:
            path = directory / f"{attack}.json"
            if path.exists():
                results.append(
                    {
                        "seed": 0,
                        "method": method,
                        "setting": setting,
                        "rerun": True,
                        **json.loads(path.read_text()),
                    }
                )
    return results


def chosen_on_test_lines(variants: list[tuple[str, str]]) -> list[str]:
    """A paragraph naming each of ``variants`` (``(method, setting)``) that was defined after
    reading test-split results (:data:`purify_benchmark.TUNED_ON`), with those attacks: its
    test columns here are not held-out measurements, whatever chose the stop (SPEC section 1).
    Empty when none was."""
    from purify_benchmark import TUNED_ON

    tuned = {
        f"{method} {setting}": sorted(TUNED_ON[(method, setting)])
        for method, setting in dict.fromkeys(variants)
        if TUNED_ON.get((method, setting))
    }
    if not tuned:
        return []
    named = "; ".join(f"`{name}` ({', '.join(attacks)})" for name, attacks in tuned.items())
    return [
        "",
        "Chosen with test data: these settings (or one they build on) were defined after "
        "reading the test-split results of the attacks in brackets (`purify_benchmark.py`, "
        f"`TUNED_ON`): {named}. Their test columns for those attacks are not held-out "
        "measurements, though the stop itself reads D_v only.",
    ]


def seed_lines(results: list[dict], acc_drop: float = 0.03, asr_max: float = 0.05) -> list[str]:
    """A table of every seed's D_v-chosen stop and test result, with the success count."""
    lines = [
        "## Every run (seed: the defense's key; the D_v split and the scan stay seed 0's)",
        "",
        f"Success: test ASR <= {asr_max} and ACC drop <= {acc_drop} from the undefended model.",
        "",
        "| method | attack | seed | stop chosen on D_v | test ACC / ASR | success |",
        "|---|---|---|---|---|---|",
    ]
    groups = dict.fromkeys((variant_label(r), r["attack"]) for r in results)
    for label, attack in groups:
        runs = sorted(
            (r for r in results if (variant_label(r), r["attack"]) == (label, attack)),
            key=lambda r: r["seed"],
        )
        for r in runs:
            c, b = r["chosen_test"], r["before_test"]
            ok = c["asr"] <= asr_max and b["acc"] - c["acc"] <= acc_drop
            lines.append(
                f"| {label} | {attack} | {r['seed']} | {r['chosen_step']}"
                f"{'' if r['reached_threshold'] else ' (not reached)'} | "
                f"{c['acc']:.3f} / {c['asr']:.3f} | {'yes' if ok else 'no'} |"
            )
        if len(runs) > 1:
            acc = np.array([r["chosen_test"]["acc"] for r in runs])
            asr = np.array([r["chosen_test"]["asr"] for r in runs])
            b = runs[0]["before_test"]
            ok = asr.mean() <= asr_max and b["acc"] - acc.mean() <= acc_drop
            spread = f"({acc.std(ddof=1):.3f} / {asr.std(ddof=1):.3f})"
            lines.append(
                f"| {label} | {attack} | mean (sd), n={len(runs)} | - | "
                f"{acc.mean():.3f} / {asr.mean():.3f} {spread} | {'yes' if ok else 'no'} |"
            )
    return lines


def write_summary(all_results: list[dict]) -> None:
    results = [
        r
        for r in all_results
        if r["seed"] == 0
        and (r["method"], r["setting"], r["rerun"]) == (METHOD, SETTING, True)
        and not r.get("overrides")
    ]
    fixed = {}
    for r in results:
        path = SCANS / f"{r['attack']}.json"
        if path.exists():
            fixed[r["attack"]] = json.loads(path.read_text())["models"].get(f"{METHOD} {SETTING}")
    rule = results[0]["rule"] if results else {}
    lines = [
        "# FIP's stop chosen on D_v with a synthesized trigger (CIFAR-10, PreAct-ResNet-18 w16)",
        "",
        f"FIP `{SETTING}` on 400 of D_v's 500 images; every {rule.get('every')} steps up to "
        f"{rule.get('max_steps')} the iterate (with transferred statistics) is scored on the "
        "100-image validation slice with the suspect trigger from Neural Cleanse "
        "(`trigger_synthesis.md`). Stop: the first check with validation ASR <= "
        f"{rule.get('threshold')}, else the lowest. FIP is then re-run with that many steps and "
        "judged on the test split. The right-hand column is the benchmark's 50-step stop, "
        "which was chosen on test data, on the same 400 images. Seed 0. A check counts only "
        "within 0.05 of the undefended model's validation ACC (the library's guard). On "
        "Input-aware, seed 0, it excluded the checks at 30-70 steps (validation ACC 0.78-0.79 "
        "against 0.85) and moved the stop from 60 to 90; the run without the guard (60 steps, "
        "test 0.837 / 0.024) is kept in `clean_set_stop/before_accuracy_guard/`. It changes no "
        "other choice here. The FIP runs of seeds 0 and 1 (Input-aware seed 0 aside) came from "
        "the script's earlier loop, which did not check the last step: where the threshold was "
        "reached that cannot matter, on WaNet and SIG it might. 'Every run' adds other seeds "
        "and FT `brief_transfer` (same learning rate, budget, split, trigger and rule) as the "
        "baseline.",
        "",
        "| attack | suspect = target | stop chosen on D_v | val. synth. ASR there | test ACC / "
        "ASR, D_v stop | test ACC / ASR, 50 steps (test-chosen) | undefended |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        at = chosen_check(r)
        ref = fixed.get(r["attack"])
        ref_text = f"{ref['test']['acc']:.3f} / {ref['test']['asr']:.3f}" if ref else "-"
        c, b = r["chosen_test"], r["before_test"]
        lines.append(
            f"| {r['attack']} | {'yes' if r['suspect'] == r['target'] else 'no'} | "
            f"{r['chosen_step']}{'' if r['reached_threshold'] else ' (not reached)'} | "
            f"{at['validation_synth_asr']:.3f} | {c['acc']:.3f} / {c['asr']:.3f} | {ref_text} | "
            f"{b['acc']:.3f} / {b['asr']:.3f} |"
        )
    lines += chosen_on_test_lines([(r["method"], r["setting"]) for r in all_results])
    lines += ["", *seed_lines(all_results)]
    lines += [
        "",
        "## Every check, seed 0 (validation: defender; test, first 2,000 images: never read by "
        "the rule)",
        "",
        "| attack | step | val. synth. ASR | val. ACC | test ACC / ASR |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for c in r["checks"]:
            t = c["charted_test"]
            lines.append(
                f"| {r['attack']} | {c['step']} | {c['validation_synth_asr']:.3f} | "
                f"{c['validation_acc']:.2f} | {t['acc']:.3f} / {t['asr']:.3f} |"
            )
    scans.write_report(
        SUMMARY, lines, all_results, lambda r: f"{variant_label(r)}, seed {r['seed']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="*", default=list(CORE_ATTACKS))
    parser.add_argument(
        "--max-steps",
        type=int,
        default=150,
        help="checks up to this step (150 in the committed FIP, Fast FIP and FT runs, 300 in "
        "NFT's)",
    )
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the defense's key (the D_v split and the Neural Cleanse scan stay seed 0's); "
        "seeds other than 0 are saved under clean_set_stop/seed<N>/",
    )
    parser.add_argument("--method", default=METHOD, help="a registered defense")
    parser.add_argument(
        "--setting", default=SETTING, help="a setting of it in purify_benchmark.METHODS"
    )
    parser.add_argument(
        "--scored-iterate",
        action="store_true",
        help="keep the iterate scored at the chosen stop (the library's default) instead of "
        "re-running the defense for that many steps (this script's default, as its first runs "
        "did); saved under clean_set_stop/<method>_<setting>_scored/",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the setting's configuration (saved under "
        "clean_set_stop/<method>_<setting>_<key><value>[_scored]/)",
    )
    parser.add_argument(
        "--full-run",
        action="store_true",
        help="run every search to --max-steps (CleanStopConfig.halt_when_reached=False), to "
        "chart every check; by default it ends at the first check under the threshold",
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    rule = stop_rule(args.threshold, args.every, args.max_steps, not args.full_run)

    def run(attack: str) -> dict:
        return run_attack(
            attack,
            args.max_steps,
            args.every,
            args.threshold,
            args.seed,
            args.method,
            args.setting,
            rerun=not args.scored_iterate,
            overrides=overrides,
            halt=not args.full_run,
        )

    rerun = not args.scored_iterate
    out = result_directory(args.method, args.setting, args.seed, rerun, overrides)
    if not args.report_only:
        check_rule(args.attacks, args.method, variant_name(args.setting, overrides), rerun, rule)
    scans.per_attack(args.attacks, out, run, args.report_only)
    write_summary(all_results(scans.stored_attacks(CORE_ATTACKS, args.attacks, OUT)))


def check_rule(attacks, method: str, variant: str, rerun: bool, rule: dict) -> None:
    """Stops the script (one line) where a stored result of this variant, any seed, was
    measured under another stop rule: a stored attack would be skipped as done, and a new seed
    pooled with the others in the mean over seeds, under different rules."""
    for result in collect_seeds(attacks, method, variant, rerun):
        mismatch = scans.stored_mismatch(result, {"rule": rule})
        if mismatch is not None:
            where = result_directory(method, variant, result["seed"], rerun)
            raise SystemExit(
                f"clean_set_stop: {where / (result['attack'] + '.json')} was measured with "
                f"{mismatch}; give the stored rule's flags, or move the results away"
            )


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["eta_F=4", ...]`` as a dict, with a one-line error for a pair without ``=``."""
    from fippure.errors import InvalidInputError

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise InvalidInputError(f"--set takes KEY=VALUE, got {bad[0]!r}")
    return dict(p.split("=", 1) for p in pairs)


def all_results(attacks: list[str]) -> list[dict]:
    """Every saved result of ``attacks``: FIP ``brief_transfer``'s, then each other
    method's and setting's directory."""
    from fippure.purify.registry import DEFENSES

    results = collect_seeds(attacks)
    # other methods' directories are named <method>_<setting> (before_accuracy_guard/ and
    # seed<N>/ are not)
    for directory in sorted(d for d in OUT.iterdir() if d.is_dir()):
        method = next(
            (
                m
                for m in sorted(DEFENSES, key=len, reverse=True)
                if directory.name.startswith(f"{m}_")
            ),
            None,
        )
        if method is not None:
            setting = directory.name[len(method) + 1 :]
            rerun = not setting.endswith(SCORED)
            setting = setting.removesuffix(SCORED)
            results += collect_seeds(attacks, method, setting, rerun)
    return results


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "clean_set_stop.py")
