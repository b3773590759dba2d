"""Can a defender tell from D_v alone whether purification worked? Neural Cleanse on the zoo.

SPEC section 1 allows thresholds and stops chosen on D_v, with a synthesized trigger where one
is needed. This script measures whether such a trigger is a usable proxy on the zoo models:

1. D_v (500 images) is split class-balanced into 400 images the defender optimises on and a
   validation slice of 100 it only measures on.
2. Neural Cleanse (:mod:`fippure.purify.trigger_inversion`) inverts a trigger for every class
   on the 400; the suspect is the flagged class (MAD anomaly index > 2) or, where none is
   flagged, the class with the smallest mask.
3. Two purifications on the 400 images: FIP ``brief_transfer`` (which removes most core
   backdoors) and FT on the same footing (which leaves most in place), the benchmark's
   settings (``purify_benchmark.py``).
4. For the original and each purified model, the defender's numbers (validation-slice ACC, the
   suspect trigger's ASR on the validation slice, and the mask a fresh inversion towards the
   suspect needs on the purified model) are set beside the test-split ACC / ASR that the
   defender never sees.

    python experiments/trigger_synthesis_check.py [--attacks badnets blend ...] [--report-only]

writes ``experiments/results/trigger_synthesis/<attack>.json`` (one per attack, so a killed run
resumes at the next attack), the ten triggers of each attack's scan
(``<attack>_triggers.npz``, with the split's rows) and
``experiments/results/trigger_synthesis.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from purify_benchmark import CORE_ATTACKS  # noqa: E402

from fippure.data.splits import hold_out_per_class  # noqa: E402

ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "trigger_synthesis"
SUMMARY = ROOT / "experiments" / "results" / "trigger_synthesis"
#: The benchmark's six core attacks, then SIG at 10% poisoning (the zoo's ``sig``), whose
#: whole-image trigger Neural Cleanse's small-mask search is not made for.
ATTACKS = (*CORE_ATTACKS, "sig")
VALIDATION_PER_CLASS = 10
#: Neural Cleanse at a CPU budget: 150 Adam steps of 32 images per class (about 40 s a class
#: here; the module's default is 300 of 64).
INVERSION = {"steps": 150, "batch_size": 32}
PURIFICATIONS = (("fip", "brief_transfer"), ("ft", "brief_transfer"))


def defender_view(model, variables, validation, trigger, spec, config, key, fit) -> dict:
    """What the defender can measure: validation ACC, the suspect trigger's ASR on the
    validation slice, and a fresh inversion towards the suspect on ``fit``."""
    from fippure.inference import accuracy
    from fippure.purify.trigger_inversion import invert_trigger, synthesized_asr

    fresh = invert_trigger(model, variables, fit, trigger.target, config, key)
    return {
        "validation_acc": accuracy(model, variables, validation.images, validation.labels, spec),
        "validation_synth_asr": synthesized_asr(
            model, variables, validation.images, validation.labels, trigger, spec
        ),
        "reinverted_mask_l1": fresh.mask_l1,
        "reinverted_success": fresh.success,
        "reinverted_validation_asr": synthesized_asr(
            model, variables, validation.images, validation.labels, fresh, spec
        ),
    }


def save_scan(path: pathlib.Path, scan, **extra) -> None:
    """The scan's masks and patterns (and ``extra`` arrays) as ``path`` (``.npz``), with the
    :data:`INVERSION` settings that made it."""
    np.savez(
        path,
        masks=np.stack([t.mask for t in scan.triggers]),
        patterns=np.stack([t.pattern for t in scan.triggers]),
        inversion=np.asarray(json.dumps(INVERSION, sort_keys=True)),
        **extra,
    )


def stored_mismatch(stored: dict, expected: dict) -> str | None:
    """The first of ``expected``'s fields that ``stored`` holds with another value, as
    ``"key = stored, not expected"``; ``None`` where all agree. A field ``stored`` lacks (saved
    before the field was recorded) is not compared; dicts are compared key by key, the same
    way."""
    expected = json.loads(json.dumps(expected))  # tuples as lists, as a saved result has them
    for key, want in expected.items():
        if key not in stored:
            continue
        have = stored[key]
        if isinstance(want, dict) and isinstance(have, dict):
            inner = stored_mismatch(have, want)
            if inner is not None:
                return f"{key}.{inner}"
        elif have != want:
            return f"{key} = {have!r}, not {want!r}"
    return None


def stored_attacks(defaults, named, out: pathlib.Path) -> list[str]:
    """The attacks a summary covers: ``defaults``, then those ``named`` on the command line,
    then any other with a result (``<attack>.json``) anywhere under ``out``; so a run on some
    attacks rewrites the summary without dropping the others' rows."""
    stored = sorted(p.stem for p in out.rglob("*.json")) if out.exists() else []
    return list(dict.fromkeys([*defaults, *named, *stored]))


def load_scan(path: pathlib.Path, model, variables, fit, config):
    """A scan saved as ``<attack>_triggers.npz``, each trigger's success measured again on
    ``fit``."""
    from fippure.purify.trigger_inversion import (
        InvertedTrigger,
        TriggerScan,
        anomaly_index,
        flagged_classes,
        synthesized_asr,
    )

    with np.load(path) as arrays:
        masks, patterns = arrays["masks"], arrays["patterns"]
        made_with = json.loads(str(arrays["inversion"])) if "inversion" in arrays else None
    mismatch = None if made_with is None else stored_mismatch(made_with, INVERSION)
    if mismatch is not None:
        raise SystemExit(
            f"{path} was scanned with {mismatch} (INVERSION); move it away to scan again"
        )
    triggers = []
    for k, (mask, pattern) in enumerate(zip(masks, patterns, strict=True)):
        trigger = InvertedTrigger(k, mask, pattern, float(mask.sum()), float("nan"), True)
        success = synthesized_asr(model, variables, fit.images, fit.labels, trigger, fit.spec)
        triggers.append(dataclasses.replace(trigger, success=success))
    norms = masks.reshape(len(masks), -1).sum(-1)
    return TriggerScan(
        tuple(triggers), anomaly_index(norms), flagged_classes(norms, config.anomaly_threshold)
    )


def measured_with() -> dict:
    """The settings a result of :func:`run_attack` records, and a stored one must match."""
    return {"inversion": dict(INVERSION), "purifications": [list(p) for p in PURIFICATIONS]}


def run_attack(attack: str) -> dict:
    import jax
    from purify_benchmark import overrides_for

    from fippure.purify.registry import get_defense, make_config
    from fippure.purify.runner import evaluate
    from fippure.purify.trigger_inversion import InversionConfig, scan_classes, synthesized_asr
    from fippure.zoo import load_backdoored

    backdoored = load_backdoored(ZOO / attack)
    spec = backdoored.spec
    fit_rows, validation_rows = hold_out_per_class(backdoored.clean.labels, VALIDATION_PER_CLASS)
    fit = backdoored.clean.subset(fit_rows)
    validation = backdoored.clean.subset(validation_rows)
    config = InversionConfig(**INVERSION)

    saved = OUT / f"{attack}_triggers.npz"
    start = time.perf_counter()
    if saved.exists():  # the scan clean_set_stop.py ran first (same split, config and key)
        scan = load_scan(saved, backdoored.model, backdoored.variables, fit, config)
        scan_seconds = None
    else:
        scan = scan_classes(
            backdoored.model, backdoored.variables, fit, config, jax.random.key(0), progress=True
        )
        scan_seconds = round(time.perf_counter() - start, 1)
    suspect = scan.suspect.target
    trigger = scan.triggers[suspect]
    save_scan(saved, scan, fit_rows=fit_rows, validation_rows=validation_rows)

    def measured(variables) -> dict:
        """The test split's numbers (never the defender's) beside the defender's own."""
        return {
            "test": evaluate(backdoored, variables),
            "test_synth_asr": synthesized_asr(
                backdoored.model, variables, test.images, test.labels, trigger, spec
            ),
            **defender_view(
                backdoored.model,
                variables,
                validation,
                trigger,
                spec,
                config,
                jax.random.key(1),
                fit,
            ),
        }

    test = backdoored.test
    result = {
        "attack": attack,
        "target": backdoored.target,
        **measured_with(),
        "scan": scan.to_dict(),
        "scan_seconds": scan_seconds,
        "suspect": suspect,
        "suspect_flagged": bool(scan.flagged),
        "models": {"undefended": measured(backdoored.variables)},
    }
    reduced = dataclasses.replace(
        backdoored, clean=fit, clean_indices=backdoored.clean_indices[fit_rows]
    )
    for method, setting in PURIFICATIONS:
        variables, report = get_defense(method).purify(
            reduced.model,
            reduced.variables,
            reduced.clean,
            make_config(method, overrides_for(method, setting)),
            jax.random.key(0),
            progress=True,
        )
        result["models"][f"{method} {setting}"] = {
            **measured(variables),
            "wall_time_s": report.wall_time_s,
        }
    return result


def write_summary(results: list[dict]) -> None:
    lines = [
        "# Neural Cleanse on D_v as the defender's proxy (CIFAR-10, PreAct-ResNet-18 w16)",
        "",
        f"D_v = the zoo's 500 clean images, split into 400 to optimise on and a validation "
        f"slice of {VALIDATION_PER_CLASS} per class. Neural Cleanse: "
        f"{INVERSION['steps']} Adam steps of {INVERSION['batch_size']} images per class. "
        "Purifications on the 400: "
        + ", ".join(f"`{m} {s}`" for m, s in PURIFICATIONS)
        + " (the benchmark's settings). Seed 0.",
        "",
        "## Detection (original model)",
        "",
        "| attack | target | suspect (flagged?) | suspect's mask (px) | median mask (px) | "
        "anomaly index | trigger's ASR: validation / test |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        scan, s = r["scan"], r["suspect"]
        und = r["models"]["undefended"]
        lines.append(
            f"| {r['attack']} | {r['target']} | {s} ({'yes' if r['suspect_flagged'] else 'no'})"
            f" | {scan['mask_l1'][s]:.1f} | {np.median(scan['mask_l1']):.1f} | "
            f"{scan['anomaly_index'][s]:.2f} | {und['validation_synth_asr']:.3f} / "
            f"{und['test_synth_asr']:.3f} |"
        )
    lines += [
        "",
        "## Defender's proxy against the test split",
        "",
        "Defender's columns: validation-slice ACC, the suspect trigger's ASR on the validation "
        "slice, and the mask a fresh inversion towards the suspect needs (with its success on "
        "the 400). Test columns: what the defender never sees.",
        "",
        "| attack | model | validation ACC | synth. ASR (val.) | re-inverted mask (px) / "
        "success | test ACC / ASR |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["models"].items():
            t = m["test"]
            lines.append(
                f"| {r['attack']} | {name} | {m['validation_acc']:.2f} | "
                f"{m['validation_synth_asr']:.3f} | {m['reinverted_mask_l1']:.1f} / "
                f"{m['reinverted_success']:.2f} | {t['acc']:.3f} / {t['asr']:.3f} |"
            )
    write_report(SUMMARY, lines, results)


def provenance_lines(results: list[dict], variant=lambda r: "") -> list[str]:
    """A table of where the results come from: one row per command, revision and machine,
    naming its runs (the attacks, each once, under ``variant(result)`` where that is not empty)
    and the dates they finished."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["command"], r["git_revision"], r["machine"]), []).append(r)
    lines = [
        "## Provenance",
        "",
        "| runs | command | revision | machine | finished (UTC) |",
        "|---|---|---|---|---|",
    ]
    for (command, revision, machine), runs in groups.items():
        attacks: dict[str, list[str]] = {}
        for r in runs:
            attacks.setdefault(variant(r), []).append(r["attack"])
        names = "; ".join(
            f"{name}: {', '.join(dict.fromkeys(a))}" if name else ", ".join(dict.fromkeys(a))
            for name, a in attacks.items()
        )
        dates = sorted(r["date"] for r in runs)
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines.append(f"| {names} | `{command}` | {revision} | {machine} | {when} |")
    return lines


def write_report(
    summary: pathlib.Path, lines: list[str], results: list[dict], variant=lambda r: ""
) -> None:
    """``summary.md`` (``lines``, then the results' provenance, :func:`provenance_lines`) and
    ``summary.json``."""
    from fippure.provenance import provenance

    prov = provenance()
    lines = [*lines, "", *provenance_lines(results, variant), ""]
    lines += [f"Report written by `{prov['command']}` at {prov['git_revision']}."]
    summary.with_suffix(".md").write_text("\n".join(lines) + "\n")
    summary.with_suffix(".json").write_text(
        json.dumps({"results": results, "provenance": prov}, indent=1, default=float)
    )


def per_attack(
    attacks, out: pathlib.Path, run, report_only: bool, expected: dict | None = None
) -> list[dict]:
    """``run(attack)`` for each attack without a result in ``out/<attack>.json`` yet (each
    saved as it finishes, with provenance, so a killed run resumes at the next attack); the
    results of all ``attacks`` that have one.

    Unless ``report_only``, a stored result that disagrees with ``expected`` (the fields of a
    result that say how it was measured, :func:`stored_mismatch`) stops the script with a
    one-line message instead of standing in for a run with other settings."""
    from fippure.provenance import provenance

    out.mkdir(parents=True, exist_ok=True)
    for attack in attacks:
        path = out / f"{attack}.json"
        if path.exists() and not report_only and expected:
            mismatch = stored_mismatch(json.loads(path.read_text()), expected)
            if mismatch is not None:
                raise SystemExit(
                    f"{path} was measured with {mismatch}; move it away to measure again"
                )
        if not path.exists() and not report_only:
            path.write_text(json.dumps({**run(attack), **provenance()}, indent=1, default=float))
            print(f"{attack}: done", flush=True)
    return stored_results(attacks, out)


def stored_results(attacks, out: pathlib.Path) -> list[dict]:
    """The stored results ``out/<attack>.json`` of those of ``attacks`` that have one."""
    paths = (out / f"{attack}.json" for attack in attacks)
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    per_attack(args.attacks, OUT, run_attack, args.report_only, measured_with())
    write_summary(stored_results(stored_attacks(ATTACKS, args.attacks, OUT), OUT))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "trigger_synthesis_check.py")
