"""What a second run of a defense costs once the first has compiled.

    python experiments/purify_reuse.py [--methods fip,fast_fip,nft,ngf,ft,ft_sam] [--steps 10]

Runs each defense with the benchmark's headline setting (``purify_benchmark.METHODS``), cut
to ``--steps`` steps so that compilation is a visible share, on the zoo's BadNets model, then
on its Blend model (same architecture, another seed), then on Blend again after clearing
JAX's caches: that third run compiles everything, as every run did before the steps were
compiled once per configuration. Counts the backend compilations of each run and checks that
the reused and the freshly compiled programs give the same weights. Writes
``experiments/results/purify_reuse.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
OUT = ROOT / "experiments" / "results" / "purify_reuse"
#: The setting of each defense (the benchmark's rows with the most core successes).
SETTINGS = {
    "fip": "midway_averaged_transfer",
    "fast_fip": "affine_transfer",
    "nft": "brief_transfer",
    "ngf": "default",
    "ft": "default",
    "ft_sam": "default",
}
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import jax
    import numpy as np
    from purify_benchmark import overrides_for

    from fippure.provenance import measured_by, provenance
    from fippure.purify.registry import get_defense, make_config
    from fippure.zoo import load_backdoored

    models = {entry: load_backdoored(ZOO / entry) for entry in ("badnets", "blend")}
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: compiles.append(event)
    )
    rows = []
    for method in args.methods.split(","):
        setting = SETTINGS[method]
        overrides = overrides_for(method, setting, steps=args.steps)
        config = make_config(method, overrides)
        calls, weights = [], []
        for label, entry, seed, cold in (
            ("first run", "badnets", 0, False),
            ("second run", "blend", 1, False),
            ("second run, caches cleared", "blend", 1, True),
        ):
            b = models[entry]
            if cold:
                jax.clear_caches()
            before = len(compiles)
            start = time.perf_counter()
            variables, report = get_defense(method).purify(
                b.model, b.variables, b.clean, config, jax.random.key(seed), progress=False
            )
            jax.block_until_ready(variables)
            seconds = time.perf_counter() - start
            count = compiles[before:].count(BACKEND_COMPILE)
            print(f"{method} {label} ({entry}): {seconds:.1f} s, {count} compiles", flush=True)
            weights.append([np.asarray(x) for x in jax.tree_util.tree_leaves(variables)])
            calls.append(
                {"call": label, "entry": entry, "seed": seed, "seconds": seconds,
                 "backend_compiles": count, "step_time_s": report.step_time_s}
            )  # fmt: skip
        same = all(np.array_equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
        rows.append({"method": method, "setting": setting, "calls": calls, "identical": same})
    meta = provenance()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "rows": rows, **meta}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# A second run of a defense on the same architecture",
        "",
        f"Each defense's benchmark setting cut to {args.steps} steps, on the zoo's "
        "PreAct-ResNet-18 "
        "w16 models: BadNets (seed 0), then Blend (seed 1) in the same process, then Blend again "
        "with JAX's caches cleared, so that it compiles everything, as every run did before "
        "the steps were compiled once per configuration. Seconds include the set-up (Fbar, "
        "TrF0, SVD) and the final statistics; compiles count XLA backend compilations.",
        "",
        "| defense (setting) | first run s (compiles) | second run s (compiles) | second, "
        "caches cleared s (compiles) | reused = fresh weights |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{c['seconds']:.1f} ({c['backend_compiles']})" for c in r["calls"])
        lines.append(
            f"| {r['method']} ({r['setting']}) | {cells} | {'yes' if r['identical'] else 'no'} |"
        )
    lines += ["", measured_by(meta)]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "purify_reuse.py")
