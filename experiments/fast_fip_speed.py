"""Fast FIP against FIP at equal steps: time per step (issue 5, "Fast FIP is at least 3x
faster than FIP"; SPEC section 3: "claimed ~5x faster than FIP: measure it").

Launch (from the repository root; about 12 minutes on 2 CPU cores)::

    python experiments/fast_fip_speed.py [--entry badnets] [--steps 30] [--rounds 3]

(the committed measurement ran ``--steps 21 --rounds 3``; its command is in the results).

Both defenses run with their default configuration (trace penalty every step, one probe,
batch 128) with the gradient norm clipped at 10 (the benchmark's ``clipped`` setting), on the
same zoo model and clean set, at a reduced number of steps; Fast FIP also runs with
``kernel_form=rebuilt``, its reference layer form, and with ``trace_estimator=per_example``,
the exact trace in place of the probe. The runs alternate (FIP, Fast FIP, Fast FIP rebuilt,
Fast FIP per-example, FIP, ...) so that contention from other jobs hits all alike. Per
run it records the median step time after compilation (from the defense's own report), the
set-up time (the SVD, the diagonal Fisher Fbar and the calibration of TrF0, all before the
first step) and the tunable-parameter count; the speed-up is FIP's step time over Fast FIP's,
the median of the per-round ratios. The set-up is reported for the first round, which
compiles, and for the later ones, which reuse the compiled programs of the same process; the
whole-defense ratio at the benchmark's budget (300 steps) and at SPEC's (2000 steps) takes the
first round's set-up (a defense run in a fresh process). ``--report-only`` rewrites the tables
from the stored JSON.

Writes ``experiments/results/fast_fip_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
#: The timed variants: name -> (defense, overrides beyond the shared ones).
VARIANTS = {
    "fip": ("fip", {}),
    "fast_fip": ("fast_fip", {}),  # kernel_form=factored, the default
    "fast_fip_rebuilt": ("fast_fip", {"kernel_form": "rebuilt"}),
    # the exact trace from per-example shift gradients instead of one probe (factored form)
    "fast_fip_per_example": ("fast_fip", {"trace_estimator": "per_example"}),
}
#: How the table names a variant.
LABELS = {
    "fast_fip_rebuilt": "fast_fip kernel_form=rebuilt",
    "fast_fip_per_example": "fast_fip trace_estimator=per_example",
}
METHODS = tuple(VARIANTS)


def time_run(backdoored, variant: str, steps: int, seed: int) -> dict:
    import jax

    from fippure.purify.registry import get_defense, make_config

    method, extra = VARIANTS[variant]
    # The benchmark's clipped setting: FIP's unclipped default can diverge within 20 steps.
    overrides = {"steps": str(steps), "log_every": "5", "max_grad_norm": "10", **extra}
    config = make_config(method, overrides)
    _, report = get_defense(method).purify(
        backdoored.model,
        backdoored.variables,
        backdoored.clean,
        config,
        jax.random.key(seed),
        progress=False,
    )
    return {
        "method": variant,
        "overrides": overrides,
        "steps": steps,
        "step_time_s": report.step_time_s,
        "wall_time_s": report.wall_time_s,
        # Everything that is not a step; the first step (compilation) counts as set-up.
        "setup_time_s": report.wall_time_s - report.step_time_s * (steps - 1),
        "tunable_parameters": report.tunable_parameters,
    }


def summarise(runs: list[dict], rounds: int) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in METHODS}
    ratios = [by["fip"][i]["step_time_s"] / by["fast_fip"][i]["step_time_s"] for i in range(rounds)]
    out = {"speedup_per_step": statistics.median(ratios), "speedup_per_step_rounds": ratios}
    for variant, suffix in (
        ("fast_fip_rebuilt", "rebuilt"),
        ("fast_fip_per_example", "per_example"),
    ):
        out[f"speedup_per_step_{suffix}"] = statistics.median(
            by["fip"][i]["step_time_s"] / by[variant][i]["step_time_s"] for i in range(rounds)
        )
    for m in METHODS:
        later = [r["setup_time_s"] for r in by[m] if r["round"] > 0]
        out[m] = {
            "step_time_s": statistics.median(r["step_time_s"] for r in by[m]),
            # The first round compiles; later rounds of a configuration reuse its compiled
            # steps, Fbar pass and TrF0 estimate in the same process.
            "setup_time_s": by[m][0]["setup_time_s"],
            "setup_time_reused_s": statistics.median(later) if later else None,
            "tunable_parameters": by[m][0]["tunable_parameters"],
        }
    for budget in (300, 2000):
        fip, fast = out["fip"], out["fast_fip"]
        out[f"speedup_defense_{budget}_steps"] = (
            fip["setup_time_s"] + budget * fip["step_time_s"]
        ) / (fast["setup_time_s"] + budget * fast["step_time_s"])
    return out


def write(summary: dict, runs: list[dict], args, meta: dict | None = None) -> None:
    from fippure.provenance import measured_by, provenance

    meta = provenance() if meta is None else meta
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"summary": summary, "runs": runs, "entry": args.entry, **meta}
    (RESULTS / "fast_fip_speed.json").write_text(json.dumps(payload, indent=1))
    verdict = "met" if summary["speedup_per_step"] >= 3 else "**missed**"
    lines = [
        "# Fast FIP against FIP at equal steps (CIFAR-10, PreAct-ResNet-18 w16)",
        "",
        f"Zoo entry `{args.entry}`, 500 clean images, default configurations (trace penalty "
        "every step, 1 probe, batch 128) with gradients clipped at norm 10, "
        f"{args.steps} steps per run, {args.rounds} alternating rounds; medians. Fast FIP runs "
        "in its default factored form and, as a reference, with `kernel_form=rebuilt`. The "
        "rounds run in one process, the variants in the table's order, so a first run reuses "
        "what it shares with a variant before it (the per-example variant: Fast FIP's "
        "factored Fbar pass); FIP's and Fast FIP's first runs share nothing.",
        "",
        "| method | tunable parameters | time / step | set-up, first run (SVD, Fbar, TrF0, "
        "compile) | set-up, later runs (compiled programs reused) |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        s = summary[m]
        name = LABELS.get(m, m)
        reused = s.get("setup_time_reused_s")
        lines.append(
            f"| {name} | {s['tunable_parameters']:,} | {s['step_time_s'] * 1000:.0f} ms | "
            f"{s['setup_time_s']:.1f} s | {'-' if reused is None else f'{reused:.1f} s'} |"
        )
    rounds = ", ".join(f"{r:.2f}" for r in summary["speedup_per_step_rounds"])
    lines += [
        "",
        f"- Speed-up per step (FIP / Fast FIP): **{summary['speedup_per_step']:.2f}x** "
        f"(rounds: {rounds}); target >= 3x: {verdict}.",
        "- Whole defense in a fresh process, set-up of a first run included: "
        f"{summary['speedup_defense_300_steps']:.2f}x at 300 steps, "
        f"{summary['speedup_defense_2000_steps']:.2f}x at 2000 steps.",
        f"- With `kernel_form=rebuilt`: {summary['speedup_per_step_rebuilt']:.2f}x per step.",
        "- With the exact trace (`trace_estimator=per_example`, per-example shift gradients "
        "differentiated in reverse over reverse, no probe): "
        f"{summary['speedup_per_step_per_example']:.2f}x per step. In factored form a "
        "shift's per-example gradient is a channel sum, so the exact trace costs about "
        "what one probe does: a forward and a backward pass and their reverse, where the "
        "probe takes a forward pass, a tangent pass and their reverse.",
        "",
        "Where the time goes. The number of tuned scalars hardly matters: FIP's trace is a "
        "Hutchinson `jax.jvp` whose cost does not grow with it. With the kernels rebuilt "
        "from the shifts, a shift's tangent `U diag(v) V^T` is a dense kernel tangent, so "
        "Fast FIP pays FIP's passes: per convolution, a kernel gradient in every reverse pass "
        "and two convolutions in the tangent pass. The factored form runs each layer as a "
        "convolution with the frozen `U`, a channel scale `relu(s + d)` and a matmul with "
        "`V^T`, so no kernel depends on the shifts: reverse passes compute input gradients "
        "only, and the tangent pass one convolution per layer. Counting 3x3 convolutions, a "
        "FIP step (cross-entropy forward and backward, trace tangent and its reverse) costs "
        "about 11 and a factored step about 6.6, near 1.7x; a measured gain above that "
        "suggests that on this CPU a kernel-gradient convolution costs more than a forward one.",
    ]
    lines += [
        "",
        measured_by(meta),
    ]
    (RESULTS / "fast_fip_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default="badnets")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the tables from the stored JSON's runs (and its provenance), no timing",
    )
    args = parser.parse_args()
    if args.report_only:
        stored = json.loads((RESULTS / "fast_fip_speed.json").read_text())
        runs = stored["runs"]
        args.entry, args.steps = stored["entry"], runs[0]["steps"]
        args.rounds = 1 + max(r["round"] for r in runs)
        meta = {k: v for k, v in stored.items() if k not in ("summary", "runs", "entry")}
        write(summarise(runs, args.rounds), runs, args, meta)
        return
    if args.steps < 11 or args.rounds < 1:
        parser.error("--steps must be at least 11 (two timed intervals) and --rounds positive")

    from fippure.zoo import load_backdoored

    backdoored = load_backdoored(ZOO / args.entry)
    runs = []
    for i in range(args.rounds):
        for method in METHODS:
            run = time_run(backdoored, method, args.steps, seed=i)
            print(f"round {i} {method}: {run['step_time_s'] * 1000:.0f} ms / step", flush=True)
            runs.append({"round": i, **run})
    write(summarise(runs, args.rounds), runs, args)


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "fast_fip_speed.py")
