"""Does a zoo model's ASR survive saving its triggered images as 8-bit pictures?

    python experiments/quantised_asr.py                  # every zoo entry
    python experiments/quantised_asr.py wanet badnets    # some

fippure (like BackdoorBench) evaluates triggers on float32 images in [0, 1]: a trigger's
sub-grey-level changes (WaNet's warp interpolates between pixels) reach the model exactly. A
real attacker ships images, which hold 8-bit values. For each zoo entry this re-evaluates ASR
and RA on the same triggered test images rounded to the nearest of the 256 grey levels, beside
the float32 numbers of the protocol. Writes ``experiments/results/quantised_asr.{json,md}`` with
the command, git revision, machine and date.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
RESULTS = ROOT / "experiments" / "results"
#: What :func:`fippure.provenance.provenance` records, kept with each row.
PROVENANCE_KEYS = ("command", "git_revision", "machine", "date")


def measure(entry: str) -> dict:
    from fippure.evaluation.metrics import attack_success_rate, robust_accuracy
    from fippure.inference import predict
    from fippure.zoo import load_backdoored

    backdoored = load_backdoored(ZOO / entry)
    triggered = backdoored.triggered
    spec = backdoored.test.spec
    as_float = np.asarray(triggered.images, np.float32)
    as_bytes = np.clip(np.rint(as_float * 255.0), 0, 255).astype(np.uint8)
    row = {"entry": entry, "images": int(len(triggered))}
    for name, images in (("float32", as_float), ("uint8", as_bytes)):
        pred = predict(backdoored.model, backdoored.variables, images, spec)
        row[f"asr_{name}"] = attack_success_rate(
            pred, triggered.true_labels, triggered.target_labels
        )
        row[f"ra_{name}"] = robust_accuracy(pred, triggered.true_labels, triggered.target_labels)
    row["max_rounding_change"] = float(np.max(np.abs(as_bytes / 255.0 - as_float)))
    return row


def stored_rows() -> list[dict]:
    """The committed table's rows, each with its ``provenance`` (rows written before each
    carried its own share the file's)."""
    path = RESULTS / "quantised_asr.json"
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    shared = {k: stored[k] for k in PROVENANCE_KEYS if k in stored}
    return [{"provenance": shared, **row} for row in stored["rows"]]


def merge_rows(stored: list[dict], measured: dict[str, dict], order: list[str]) -> list[dict]:
    """``stored`` with the entries just ``measured`` replaced or added, in zoo order: a run on
    some entries keeps the others' rows."""
    rows = {r["entry"]: r for r in stored} | measured
    return [rows[e] for e in order if e in rows] + [rows[e] for e in sorted(rows) if e not in order]


def provenance_lines(rows: list[dict]) -> list[str]:
    """One "Measured by ..." line per command, revision, machine and date, naming its entries."""
    from fippure.provenance import measured_by

    groups: dict[tuple, list[str]] = {}
    for r in rows:
        groups.setdefault(tuple(r["provenance"].get(k) for k in PROVENANCE_KEYS), []).append(
            r["entry"]
        )
    lines = [measured_by(dict(zip(PROVENANCE_KEYS, key, strict=True))) for key in groups]
    if len(lines) == 1:
        return lines
    return [
        f"- {', '.join(names)}: {line}" for names, line in zip(groups.values(), lines, strict=True)
    ]


def main() -> None:
    from fippure.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("entries", nargs="*", help="zoo entries (default: all but clean)")
    args = parser.parse_args()
    known = sorted(p.name for p in ZOO.iterdir() if (p / "metadata.json").exists())
    entries = args.entries or [e for e in known if e != "clean"]
    unknown = sorted(set(entries) - set(known))
    if unknown:
        raise SystemExit(f"quantised_asr: unknown zoo entries {unknown}; known: {known}")

    meta = provenance()
    measured = {}
    for entry in entries:
        r = measured[entry] = {**measure(entry), "provenance": meta}
        print(f"{entry}: ASR {r['asr_float32']:.4f} -> {r['asr_uint8']:.4f}", flush=True)
    rows = merge_rows(stored_rows(), measured, known)
    lines = [
        "# ASR on float32 triggered images against the same images rounded to 8 bits",
        "",
        "Zoo models (CIFAR-10, PreAct-ResNet-18 width 16), every non-target test image "
        "triggered. The benchmark's numbers are the float32 ones (BackdoorBench's protocol).",
        "",
        "| entry | ASR float32 | ASR uint8 | RA float32 | RA uint8 | largest rounding change |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['asr_float32']:.4f} | {r['asr_uint8']:.4f} | "
            f"{r['ra_float32']:.4f} | {r['ra_uint8']:.4f} | {r['max_rounding_change'] * 255:.2f}"
            " / 255 |"
        )
    below = [r["entry"] for r in rows if r["asr_float32"] >= 0.9 > r["asr_uint8"]]
    lines += [
        "",
        "Entries whose ASR falls below the zoo's 0.90 bar once rounded: "
        + (", ".join(below) if below else "none")
        + ".",
        "",
        *provenance_lines(rows),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantised_asr.json").write_text(json.dumps({"rows": rows, **meta}, indent=1))
    (RESULTS / "quantised_asr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "quantised_asr")
