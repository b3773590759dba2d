"""What a second ``analyze_curvature`` call costs once the first has compiled.

    python experiments/analysis_reuse.py [--images 100]

Analyses two checkpoints of one architecture in one process: the zoo's BadNets and Blend
models (PreAct-ResNet-18 width 16), on the first ``--images`` images of each one's clean set,
with a light configuration (4 Hutchinson probes, 10 power and 10 Lanczos steps, 1 SLQ probe)
so that compilation is a visible share of the time. Then it clears JAX's caches and
fippure's cached loss functions and analyses the Blend model again: that third call compiles
everything, as every call did before the loss functions were cached per model. Per-stage times
come from the report's ``timings_s``. Writes ``experiments/results/analysis_reuse.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "analysis_reuse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="clean images per analysis")
    args = parser.parse_args()

    import time

    import jax
    import jax.numpy as jnp

    from fippure.curvature import analysis
    from fippure.data import normalize, to_unit_range
    from fippure.provenance import measured_by, provenance
    from fippure.zoo import load_backdoored

    config = analysis.AnalysisConfig(
        hutchinson_probes=4, power_iters=10, lanczos_iters=10, slq_probes=1
    )
    calls = []
    for label, entry, cold in (
        ("first checkpoint", "badnets", False),
        ("second checkpoint", "blend", False),
        ("second checkpoint, caches cleared", "blend", True),
    ):
        model = load_backdoored(ZOO / entry)
        inputs = normalize(
            to_unit_range(jnp.asarray(model.clean.images[: args.images])), model.spec
        )
        labels = jnp.asarray(model.clean.labels[: args.images])
        if cold:
            jax.clear_caches()
            analysis._cached_cross_entropy_functions.cache_clear()
        start = time.perf_counter()
        report, _ = analysis.analyze_curvature(
            model.model, model.variables, inputs, labels, jax.random.key(0), config
        )
        seconds = time.perf_counter() - start
        print(f"{label} ({entry}): {seconds:.1f} s", flush=True)
        calls.append(
            {
                "call": label,
                "entry": entry,
                "seconds": seconds,
                "timings_s": report["timings_s"],
                "lambda_max": report["lambda_max"],
                "trace_empirical_fisher": report["trace_empirical_fisher"],
            }
        )
    meta = provenance()
    result = {"images": args.images, "config": config.__dict__, "calls": calls, **meta}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stages = list(calls[0]["timings_s"])
    lines = [
        "# A second curvature analysis of the same architecture",
        "",
        f"`analyze_curvature` on zoo PreAct-ResNet-18 w16 models, {args.images} clean images, "
        "4 Hutchinson probes, 10 power and 10 Lanczos steps, 1 SLQ probe. The third call clears "
        "JAX's caches and fippure's cached loss functions first, so it compiles everything.",
        "",
        "| call | entry | total s | " + " | ".join(s.removesuffix("_s") for s in stages) + " |",
        "|---|---|---|" + "---|" * len(stages),
    ]
    for c in calls:
        cells = " | ".join(f"{c['timings_s'][s]:.1f}" for s in stages)
        lines.append(f"| {c['call']} | {c['entry']} | {c['seconds']:.1f} | {cells} |")
    same = calls[1]["lambda_max"] == calls[2]["lambda_max"]
    lines += [
        "",
        f"lambda_max of the Blend model: {calls[1]['lambda_max']:.4f} (reused) and "
        f"{calls[2]['lambda_max']:.4f} (recompiled): {'identical' if same else 'different'}.",
        "",
        measured_by(meta),
    ]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "analysis_reuse.py")
