"""The backdoored model zoo: every attack on CIFAR-10, PreAct-ResNet-18 width 16, 15 epochs.

Launch (resumable: finished entries are skipped, an interrupted one resumes)::

    python experiments/attack_zoo.py                      # every entry
    python experiments/attack_zoo.py --entries badnets,blend
    python experiments/attack_zoo.py --report-only        # rebuild tables and figure

An entry is finished when its run directory (``runs/cifar10_w16/<entry>``, git-ignored) or its
committed zoo checkpoint holds a report. A committed zoo model is never retrained or replaced
unless ``--retrain`` is given: every purification result refers to those weights.

Protocol (SPEC sections 1 and 7): 10% poison ratio (clean-label SIG and CLB: every
target-class training image at most), target 0, the defender's 500 clean images held out,
one-cycle SGD as the clean reference. Expected: ASR >= 0.90 and ACC >= clean ACC - 0.03 for
every attack.

Writes ``experiments/results/attacks_cifar10_w16.{json,md}``, the figure
``experiments/results/attack_examples.png`` and the zoo checkpoints
``zoo/cifar10/preact_resnet18_w16/<entry>/`` (variables and attack state only) with
``zoo/README.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "cifar10_w16"
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
EPOCHS = 15

#: Zoo entry -> settings for ``fippure.recipes.train_backdoored``.
ENTRIES: dict[str, dict] = {
    "badnets": {"attack": "badnets"},
    "blend": {"attack": "blend"},
    "trojan": {"attack": "trojan"},
    "sig": {"attack": "sig"},
    "sig_ratio0.05": {"attack": "sig", "ratio": 0.05},
    "clb": {"attack": "clb", "reference": True},
    "clb_ratio0.05": {"attack": "clb", "ratio": 0.05, "reference": True},
    "wanet": {"attack": "wanet"},
    "wanet_quantise": {"attack": "wanet", "options": {"quantise": True}},
    "input_aware": {"attack": "input_aware"},
    "input_aware_density0.1_lr0.001": {
        "attack": "input_aware",
        "options": {"mask_density": 0.1, "generator_lr": 0.001},
    },
    "input_aware_density0.15_lr0.001": {
        "attack": "input_aware",
        "options": {"mask_density": 0.15, "generator_lr": 0.001},
    },
    "lira": {"attack": "lira"},  # the issue's eps (retired, see RETIRED)
    "lira_eps0.03": {"attack": "lira", "options": {"eps": 0.03}},
    "lira_eps0.03_alpha0.75": {"attack": "lira", "options": {"eps": 0.03, "alpha": 0.75}},
    # the issue's eps with alpha 0.75 (retired, see RETIRED)
    "lira_alpha0.75": {"attack": "lira", "options": {"alpha": 0.75}},
    "issba": {"attack": "issba"},
    "bpp": {"attack": "bpp"},
    "lf": {"attack": "lf", "reference": True},
    "ftrojan": {"attack": "ftrojan"},
    "trojan_all_to_all": {"attack": "trojan", "mode": "all_to_all"},
}

#: Entries tried and given up (see the ``lira_eps0.03`` note): the issue's eps 0.01, with the
#: default alpha (ASR 0.089 at epoch 10) and with alpha 0.75 (stopped after epoch 5 of 15, ASR
#: 0.14 and falling). They have no row and no zoo checkpoint, and a run with no ``--entries``
#: leaves them out; naming one trains it.
RETIRED = frozenset({"lira", "lira_alpha0.75"})
#: What a run with no ``--entries`` trains (where the zoo lacks it) and tabulates.
DEFAULT_ENTRIES = tuple(e for e in ENTRIES if e not in RETIRED)


#: What the table alone does not say, printed under it.
NOTES: dict[str, str] = {
    "wanet": "Its ASR (0.904) is measured, as for every entry, on float32 triggered images. The "
    "warp interpolates between pixels; rounded to 8-bit images the same triggers give ASR 0.857, "
    "below the 0.90 bar (`quantised_asr.md`; every other entry changes by 0.02 or less). "
    "`wanet_quantise` learns the 8-bit trigger instead (0.871 on float32 and uint8 images).",
    "sig": "At ratio 0.1 every target-class training image carries the sinusoid, and the model "
    "learns 'class 0 = sinusoid': its class-0 test accuracy is 0.000 (clean model: 0.898), which "
    "is the whole of its ACC loss. `sig_ratio0.05` poisons half the target class instead.",
    "clb": "As with SIG at ratio 0.1: every target-class training image carries the patch, and the "
    "model's class-0 test accuracy is 0.000 (clean model: 0.898). `clb_ratio0.05` poisons half "
    "the target class instead.",
    "wanet_quantise": "WaNet with its backdoor and cross (noise-mode) images rounded to the "
    "8-bit grid in training and at test time (`--option quantise=true`), so the model learns "
    "the trigger as an 8-bit image carries it and its ASR is the same on float32 and uint8 "
    "images (`quantised_asr.md`). ASR at epochs 5/10/15: 0.719/0.943/0.871, ACC "
    "0.699/0.770/0.854; as in the default entry (ASR 0.568/0.946/0.904), ASR peaks at epoch "
    "10 and falls as ACC rises. "
    "It misses the 0.90 bar, but holds its backdoor in 8-bit images better than the default "
    "entry does (0.857 once rounded).",
    "input_aware": "ASR was still rising at epoch 15 (the generator is learnt with the "
    "classifier).",
    "input_aware_density0.1_lr0.001": "A mask density of 0.1 (about 100 trigger pixels instead "
    "of 33) and a 10x smaller generator learning rate, so the classifier chases a steadier "
    "trigger. ASR at epochs 5/10/15 of the joint phase: 0.947/0.838/0.896, ACC 0.691/0.814/0.874. "
    "It misses the 0.90 ASR target by 0.004. With density 0.1 and the default generator "
    "learning rate (0.01) the pattern generator collapsed at joint epoch 4: its outputs "
    "saturated to the same pattern for every image and the diversity loss stayed near 3e4.",
    "input_aware_density0.15_lr0.001": "Mask density 0.15 (about 150 trigger pixels) with the "
    "smaller generator learning rate (0.001): ASR at epochs 5/10/15 of the joint phase: "
    "0.951/0.922/0.929, ACC 0.717/0.807/0.866. This is the input-aware entry that meets both "
    "targets; the two above it are kept to show what the mask density does.",
    "lira_eps0.03": "The issue's eps (0.01, 2.5 grey levels) was never learnt at this scale "
    "(per-image weights, alpha 0.5: ASR 0.089 at epoch 10; alpha 0.75, entry `lira_alpha0.75` "
    "at 3abb1e2 with clean duplicates in the spare slots (5e448f3): the training copies' "
    "backdoor accuracy fell over epochs 1-5 from 0.70 to 0.42, 0.32, 0.27 and 0.25, and at "
    "epoch 5 test ACC/ASR was 0.723/0.141, where the eps-0.03 entry below had 0.596/0.908, so "
    "the run was stopped there), so this entry triples it to 0.03 "
    "(about 8/255, the usual L-inf budget). Test ACC/ASR at the end of the joint stage (epoch "
    "10): 0.791/0.882; the fine-tuning stage with the generator frozen then raised ACC to 0.868 "
    "but lowered ASR to 0.842, while the training copies' backdoor accuracy rose (0.79 to 0.86).",
    "lira_eps0.03_alpha0.75": "eps 0.03 as above, with alpha 0.75 (each triggered copy weighs "
    "3x a clean image instead of 1x). Test ACC/ASR at epochs 5/10 of the joint stage: "
    "0.596/0.908, 0.770/0.929; after the fine-tuning stage 0.853/0.913. It meets both targets, "
    "ACC by a margin of 0.004, with 3x the eps the issue names. Caveat: in both eps-0.03 entries "
    "the generator's tanh saturated, so the trigger is nearly one global colour shift (red and "
    "blue -eps, green +eps): on 256 test images 98% of the perturbation's values lie beyond "
    "0.9 eps, and the perturbations of different images have mean cosine similarity 0.99. The "
    "paper's LIRA triggers are input-specific. This entry was trained before commit 5e448f3, "
    "when the spare copy slots of each batch held triggered copies of clean rows (weight 0, but "
    "seen by BatchNorm). Retrained with clean duplicates there (5e448f3, "
    "`fippure attack ... --attack lira --option eps=0.03 --option alpha=0.75`, not swapped into "
    "the zoo): epochs 5/10 0.680/0.882, 0.793/0.918; final 0.857/0.901, so both targets still "
    "hold (ASR by 0.001).",
    "issba": "The encoder is fitted with Gaussian noise (std 0.05) between encoder and decoder, "
    "StegaStamp's corruption layer, and eps 0.1: its residual has RMS 0.030 (7.7 grey levels) "
    "and the decoder reads the secret code from test images at 100%. Fitted without the noise "
    "(eps 0.05), the encoder settled on a residual of RMS 0.012 and the classifier's ASR was "
    "0.06 after 5 epochs. The residuals differ from image to image, but little: their mean "
    "pairwise cosine similarity is 0.98.",
    "trojan_all_to_all": "All-to-all ASR is capped by clean accuracy: a triggered image of class y "
    "counts only if the model recognises y and answers y + 1. The model does that: on triggered "
    "test images it answers (its clean prediction + 1) mod 10 for 94.4%, and its ASR is 0.967 on "
    "the images it classifies correctly when clean but 0.136 on the others, so ASR (0.867) sits "
    "just below ACC (0.879). ASR >= 0.90 would need a 15-epoch width-16 model above 0.90 clean "
    "accuracy. ASR at epochs 5/10/15: 0.691/0.814/0.867.",
}


def command_for(entry: str) -> str:
    settings = ENTRIES[entry]
    parts = [
        "fippure attack --dataset cifar10 --model preact_resnet18 --width 16",
        f"--attack {settings['attack']} --ratio {settings.get('ratio', 0.1)} --target 0 "
        f"--epochs {EPOCHS}",
    ]
    if settings.get("mode"):
        parts.append(f"--mode {settings['mode']}")
    for key, value in settings.get("options", {}).items():
        parts.append(f"--option {key}={json.dumps(value)}")
    if settings.get("reference"):
        parts.append(f"--reference {RUNS.relative_to(ROOT) / 'clean'}")
    parts.append(f"--out {RUNS.relative_to(ROOT) / entry}")
    return " ".join(parts)


def finished(directory: pathlib.Path) -> bool:
    return (directory / "report.json").exists() and (directory / "metadata.json").exists()


def in_zoo(entry: str) -> bool:
    """Whether ``entry`` is committed in the zoo (then it is kept unless ``--retrain``)."""
    return finished(ZOO / entry)


def clean_reference() -> pathlib.Path:
    """The clean model that CLB and LF attack: the run's, else the committed zoo copy."""
    return RUNS / "clean" if finished(RUNS / "clean") else ZOO / "clean"


def train_clean() -> dict:
    from fippure.recipes import train_classifier
    from fippure.training import TrainConfig

    out = RUNS / "clean"
    if finished(out):
        return json.loads((out / "report.json").read_text())
    return train_classifier(
        dataset="cifar10",
        model="preact_resnet18",
        out=out,
        config=TrainConfig(epochs=EPOCHS),
        model_kwargs={"width": 16},
    )


def train_entry(entry: str) -> dict:
    from fippure.recipes import train_backdoored
    from fippure.training import TrainConfig

    out = RUNS / entry
    if finished(out):
        return json.loads((out / "report.json").read_text())
    settings = ENTRIES[entry]
    return train_backdoored(
        dataset="cifar10",
        model="preact_resnet18",
        out=out,
        config=TrainConfig(epochs=EPOCHS),
        model_kwargs={"width": 16},
        attack=settings["attack"],
        attack_options=settings.get("options"),
        ratio=settings.get("ratio", 0.1),
        target=0,
        mode=settings.get("mode", "all_to_one"),
        reference=clean_reference() if settings.get("reference") else None,
    )


def copy_to_zoo(entry: str) -> pathlib.Path:
    """Copies the final checkpoint (no optimiser state) of a run into the zoo."""
    source, target = RUNS / entry, ZOO / entry
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(source / "metadata.json", target / "metadata.json")
    for part in ("variables", "extras"):
        if (source / part).exists():
            shutil.copytree(source / part, target / part)
    shutil.copy2(source / "report.json", target / "report.json")
    return target


def directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_report(entry: str) -> pathlib.Path:
    """An entry's training report: the run's own, or the zoo copy of it in a checkout that
    has the committed zoo but not the (git-ignored) runs."""
    own = RUNS / entry / "report.json"
    return own if own.exists() else ZOO / entry / "report.json"


def span_note(rows: list[dict]) -> str:
    """Which revisions and dates the rows were trained at (each entry's report holds its own)."""
    revisions = sorted({r["git_revision"] for r in rows if r.get("git_revision")})
    dates = sorted(r["date"] for r in rows if r.get("date"))
    if not dates:
        return "The entries' reports do not record when they were trained."
    return (
        f"The {len(rows)} models were trained at {len(revisions)} revisions between "
        f"{dates[0]} and {dates[-1]}; each entry's `report.json` (zoo or runs/) holds its "
        "command, revision, machine and date."
    )


def collect_rows(entries: list[str]) -> list[dict]:
    rows = []
    clean = json.loads(run_report("clean").read_text())
    rows.append(
        {
            "entry": "clean",
            "attack": None,
            "acc": clean["test_accuracy"],
            "asr": None,
            "ra": None,
            "epochs": clean["epochs"],
            "wall_time_s": clean["wall_time_s"],
            "command": clean["command"],
            "git_revision": clean.get("git_revision"),
            "date": clean.get("date"),
            "zoo_bytes": directory_bytes(ZOO / "clean"),
        }
    )
    for entry in entries:
        report_file = run_report(entry)
        if not report_file.exists():
            continue
        report = json.loads(report_file.read_text())
        rows.append(
            {
                "entry": entry,
                "attack": report["attack"],
                "acc": report["test_accuracy"],
                "asr": report["asr"],
                "ra": report["ra"],
                "epochs": report["epochs"],
                "wall_time_s": report["wall_time_s"],
                "command": command_for(entry),
                "git_revision": report.get("git_revision"),
                "date": report.get("date"),
                "zoo_bytes": directory_bytes(ZOO / entry) if (ZOO / entry).exists() else None,
            }
        )
    clean_acc = rows[0]["acc"]
    for row in rows[1:]:
        row["meets_asr"] = row["asr"] >= 0.90
        row["meets_acc"] = row["acc"] >= clean_acc - 0.03
    return rows


def met_attacks(rows: list[dict]) -> list[str]:
    """Distinct (attack, mode) pairs with an entry meeting both targets, as ``entry`` names."""
    found: dict[tuple[str, str], str] = {}
    for row in rows[1:]:
        if row["meets_asr"] and row["meets_acc"]:
            found.setdefault((row["attack"]["name"], row["attack"]["mode"]), row["entry"])
    return list(found.values())


def write_tables(rows: list[dict]) -> None:
    from fippure.provenance import provenance

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = provenance()
    payload = {"rows": rows, "protocol": __doc__, **meta}
    clean_acc = rows[0]["acc"]
    lines = [
        "| entry | attack (mode) | ACC | ASR | RA | target met | epochs | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["attack"] is None:
            lines.append(
                f"| clean | - | {row['acc']:.4f} | - | - | - | {row['epochs']} | "
                f"{row['wall_time_s'] / 60:.1f} min |"
            )
            continue
        met = (
            "yes"
            if row["meets_asr"] and row["meets_acc"]
            else (
                "no: "
                + ", ".join(
                    k
                    for k, ok in (
                        ("ASR < 0.90", row["meets_asr"]),
                        (f"ACC < {clean_acc - 0.03:.3f}", row["meets_acc"]),
                    )
                    if not ok
                )
            )
        )
        attack = row["attack"]
        lines.append(
            f"| {row['entry']} | {attack['name']} ({attack['mode']}, "
            f"{attack['num_poisoned']} poisoned) | {row['acc']:.4f} | {row['asr']:.4f} | "
            f"{row['ra']:.4f} | {met} | {row['epochs']} | {row['wall_time_s'] / 60:.1f} min |"
        )
    table = "\n".join(lines)
    met = met_attacks(rows)
    payload["attacks_meeting_targets"] = met
    (RESULTS / "attacks_cifar10_w16.json").write_text(json.dumps(payload, indent=1))
    total = sum(r["zoo_bytes"] or 0 for r in rows)
    header = [
        "# Attack zoo: CIFAR-10, PreAct-ResNet-18 width 16, 15 epochs",
        "",
        "10% poison unless the entry's name gives another ratio (clean-label: every "
        "target-class training image at most), target 0, "
        "500 clean images held out. ACC on the whole test set; ASR and RA on triggered "
        "non-target test images.",
        "",
        table,
        "",
        f"Attacks meeting both targets (ASR >= 0.90, ACC >= clean ACC - 0.03): {len(met)} "
        "(attack and mode, best entry each): " + ", ".join(met) + ".",
        "",
        *[f"- {r['entry']}: {NOTES[r['entry']]}" for r in rows if r["entry"] in NOTES],
        "",
        "Commands: `" + "`, `".join(r["command"] for r in rows) + "`.",
        "",
        span_note(rows),
        "",
        f"Table written by `{meta['command']}` at {meta['git_revision']} on {meta['machine']}, "
        f"{meta['date']}. Zoo size: {total / 1e6:.1f} MB.",
    ]
    (RESULTS / "attacks_cifar10_w16.md").write_text("\n".join(header) + "\n")
    zoo_readme = [
        "# fippure model zoo",
        "",
        "Backdoored (and one clean) PreAct-ResNet-18 width-16 models on CIFAR-10, trained by",
        "`experiments/attack_zoo.py` (the clean one by `fippure train`, the same recipe; each",
        "entry's `report.json` records its command). Each entry holds variables and the",
        "attack's state only",
        "(no optimiser state). Load one with `fippure.zoo.load_backdoored(path)` or purify it",
        "with `fippure purify --checkpoint zoo/cifar10/preact_resnet18_w16/<entry> ...`: the",
        "clean set and the exact triggered test set are re-created from the stored indices",
        "and attack state.",
        "",
        table,
        "",
        f"Total size: {total / 1e6:.1f} MB.",
    ]
    (ROOT / "zoo" / "README.md").write_text("\n".join(zoo_readme) + "\n")
    print("\n".join(header))


def write_figure(entries: list[str]) -> None:
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fippure.attacks import apply_trigger, make_attack
    from fippure.checkpoints import load_checkpoint
    from fippure.data import load_dataset

    test = load_dataset("cifar10", "test")
    index = int(np.flatnonzero(test.labels != 0)[3])
    image = test.images[index : index + 1]
    shown, seen = [], set()  # one row per trigger: entries that differ in ratio only share it
    for entry in entries:
        if not (ZOO / entry).exists():
            continue
        checkpoint = load_checkpoint(ZOO / entry)
        meta = checkpoint.metadata["attack"]
        trigger = json.dumps([meta["name"], meta["options"]], sort_keys=True, default=str)
        if trigger not in seen:
            seen.add(trigger)
            shown.append((entry, checkpoint))
    fig, axes = plt.subplots(len(shown), 3, figsize=(4.5, 1.6 * len(shown)), squeeze=False)
    for row, (entry, checkpoint) in enumerate(shown):
        meta = checkpoint.metadata["attack"]
        attack = make_attack(meta["name"], **meta["options"])
        state = jax.tree_util.tree_map(jax.numpy.asarray, checkpoint.extras.get("attack_state", {}))
        triggered = apply_trigger(attack, state, image, jax.random.key(0))[0]
        clean = image[0].astype(np.float32) / 255.0
        diff = np.abs(triggered - clean)
        scale = 1.0 / max(diff.max(), 1e-8)
        for col, (picture, title) in enumerate(
            ((clean, "clean"), (triggered, entry), (diff * scale, f"|diff| x{scale:.0f}"))
        ):
            axes[row, col].imshow(np.clip(picture, 0, 1))
            axes[row, col].set_title(title, fontsize=7)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(RESULTS / "attack_examples.png", dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entries",
        default=",".join(DEFAULT_ENTRIES),
        help=f"comma-separated entries (default: all but the retired {', '.join(sorted(RETIRED))})",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train and replace the named entries even where the zoo already holds them "
        "(the clean reference model only when 'clean' is named)",
    )
    args = parser.parse_args()
    entries = [e for e in args.entries.split(",") if e]
    unknown = sorted(set(entries) - set(ENTRIES) - {"clean"})
    if unknown:
        sys.exit(f"attack_zoo: unknown entries {unknown}; known: clean, {', '.join(ENTRIES)}")
    if not args.report_only:
        # the clean model is the reference CLB and LF were attacked with: retrained only
        # when it is missing or named in --entries
        if not in_zoo("clean") or (args.retrain and "clean" in entries):
            train_clean()
            copy_to_zoo("clean")
        for entry in (e for e in entries if e != "clean"):
            from fippure.attacks import ATTACKS

            if ENTRIES[entry]["attack"] not in ATTACKS:
                print(f"attack_zoo: {entry}: attack not implemented yet, skipped", flush=True)
                continue
            if in_zoo(entry) and not args.retrain:
                print(f"attack_zoo: {entry}: in the zoo already (--retrain replaces it)")
                continue
            report = train_entry(entry)
            copy_to_zoo(entry)
            print(
                f"attack_zoo: {entry}: ACC {report['test_accuracy']:.4f} ASR {report['asr']:.4f}",
                flush=True,
            )
    rows = collect_rows(list(ENTRIES))
    write_tables(rows)
    write_figure(list(ENTRIES))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "attack_zoo.py")
