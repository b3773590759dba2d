"""The checks CI cannot make: fippure's step loops, timings and memory on a GPU (or TPU).

Launch in two halves, since the accelerator machine has no CIFAR-10::

    # where CIFAR-10 is (TFDS_DATA_DIR): the zoo entry's clean set as a 1.5 MB file
    python experiments/accelerator_check.py export-clean --to accel/clean_badnets.npz
    # on the accelerator (about 6 minutes on one H200)
    python experiments/accelerator_check.py run --clean-set accel/clean_badnets.npz \
        [--revision REV] [--budget-s 480] [--out experiments/results]

``run`` makes three checks, each written to the results as soon as it is done, and skips a
check that would not fit in what is left of ``--budget-s``:

- ``speed``: Fast FIP against FIP at equal steps (issue 5's 3x target), as
  ``fast_fip_speed.py`` times them: the zoo's PreAct-ResNet-18 w16 BadNets model and its
  500-image clean set, then the same network at full width (w64, random weights: a step's
  cost does not depend on the values).
- ``guard``: the tests that run every step loop under ``guard_step_transfers("disallow")``
  (``tests/test_step_transfer_guard.py``, ``tests/purify/test_compiled_steps.py``). On the CPU,
  JAX guards only uploads; here it also guards fetches back to the host, so a loop that syncs
  the device at every step fails.
- ``memory``: the peak device memory of FIP on w64 with its step's carry donated (the
  default), with donation turned off, and with ``fisher_chunk`` 10 instead of 50 (to tell
  whether the diagonal Fisher's per-example gradients set the peak), each in a fresh process
  (the allocator's peak is per process).
- ``speed_w64``: the speed check at full width.
- ``speed_w16_bf16``: the speed check at w16 with the model computing in bfloat16
  (``fippure.models.with_dtype``; the weights stay float32).

Writes ``accelerator_check.{json,md}`` under ``--out``. Results of checks that a run does not
make are kept from the file already there, each with the revision and date it was measured
at, so the checks can be spread over several sessions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
ZOO = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16"
GUARD_TESTS = ("tests/test_step_transfer_guard.py", "tests/purify/test_compiled_steps.py")
#: Rough seconds each check needs on one H200 (compilation dominates), to skip what won't fit.
NEEDS_S = {
    "speed_w16": 100,
    "guard": 150,
    "memory": 180,
    "speed_w64": 100,
    "speed_w16_bf16": 100,
}

sys.path.insert(0, str(ROOT / "experiments"))


def export_clean(args) -> None:
    import numpy as np

    from fippure.zoo import load_backdoored

    clean = load_backdoored(ZOO / args.entry).clean
    path = pathlib.Path(args.to)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=clean.images, labels=clean.labels, entry=args.entry)
    print(f"wrote {len(clean)} clean images of {args.entry} to {path}")


def _subject(clean_set: str, width: int, dtype: str | None = None):
    """The model, its variables and the clean set: the zoo entry at w16, random weights at
    other widths; the model computes in ``dtype`` (default: float32)."""
    import types

    import jax
    import numpy as np

    from fippure.checkpoints import load_checkpoint
    from fippure.data.catalog import get_spec
    from fippure.data.sources import ImageDataset
    from fippure.models import create_model, init_variables, with_dtype

    stored = np.load(clean_set)
    spec = get_spec("cifar10")
    clean = ImageDataset(stored["images"], stored["labels"], spec, "clean")
    if width == 16:
        checkpoint = load_checkpoint(ZOO / str(stored["entry"]))
        model, variables = checkpoint.model, checkpoint.variables
    else:
        model = create_model("preact_resnet18", spec.num_classes, width=width)
        variables = init_variables(model, jax.random.key(0), spec.image_shape)
    return types.SimpleNamespace(model=with_dtype(model, dtype), variables=variables, clean=clean)


def check_speed(args, width: int, dtype: str | None = None) -> dict:
    from fast_fip_speed import METHODS, summarise, time_run

    subject = _subject(args.clean_set, width, dtype)
    runs = []
    for i in range(args.rounds):
        for method in METHODS:
            run = time_run(subject, method, args.steps, seed=i)
            print(
                f"w{width} round {i} {method}: {run['step_time_s'] * 1e3:.2f} ms/step", flush=True
            )
            runs.append({"round": i, **run})
    return {
        "width": width,
        "dtype": dtype or "float32",
        "steps": args.steps,
        "summary": summarise(runs, args.rounds),
        "runs": runs,
    }


def check_guard(args) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GUARD_TESTS]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {
        "command": " ".join(command[1:]),
        "returncode": done.returncode,
        "passed": done.returncode == 0,
        "summary": tail[-1] if tail else "",
        "tail": tail,
        "wall_s": time.perf_counter() - started,
    }


def _without_donation() -> None:
    """Makes every ``jax.jit`` created from now on ignore ``donate_argnums``."""
    import jax

    original = jax.jit

    def jit(fun=None, /, **kwargs):
        kwargs.pop("donate_argnums", None)
        kwargs.pop("donate_argnames", None)
        return functools.partial(jit, **kwargs) if fun is None else original(fun, **kwargs)

    jax.jit = jit


def memory_probe(args) -> None:
    """One FIP run in this process; prints its peak device memory as JSON."""
    import jax

    from fippure.purify.registry import get_defense, make_config

    if not args.donate:
        _without_donation()
    subject = _subject(args.clean_set, args.width)
    config = make_config(
        "fip",
        {
            "steps": str(args.steps),
            "log_every": "4",
            "max_grad_norm": "10",
            "fisher_chunk": str(args.fisher_chunk),
        },
    )
    _, report = get_defense("fip").purify(
        subject.model, subject.variables, subject.clean, config, jax.random.key(0), progress=False
    )
    stats = jax.devices()[0].memory_stats() or {}
    params = sum(x.nbytes for x in jax.tree_util.tree_leaves(subject.variables["params"]))
    print(
        json.dumps(
            {
                "donate": args.donate,
                "fisher_chunk": args.fisher_chunk,
                "width": args.width,
                "steps": args.steps,
                "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                "params_bytes": params,
                "step_time_s": report.step_time_s,
            }
        )
    )


def check_memory(args) -> dict:
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    out = {}
    probes = {"donated": (True, 50), "not_donated": (False, 50), "donated_chunk10": (True, 10)}
    for name, (donate, chunk) in probes.items():
        command = [
            sys.executable,
            __file__,
            "memory-probe",
            "--clean-set",
            args.clean_set,
            "--width",
            "64",
            "--steps",
            "12",
            "--fisher-chunk",
            str(chunk),
            *(["--donate"] if donate else []),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            out[name] = {"error": done.stderr[-2000:]}
            continue
        out[name] = json.loads(lines[-1])
        print(lines[-1], flush=True)
    return out


def _write(results: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator_check.json").write_text(json.dumps(results, indent=1))
    (out / "accelerator_check.md").write_text(report_markdown(results))


def _measured(part: dict) -> str:
    """`` (at REV, DATE)`` for a check kept from an earlier run, else nothing."""
    at = part.get("measured")
    return f" (measured at {at['revision'][:7]}, {at['date']})" if at else ""


def _kept_results(out: pathlib.Path, rerun: list[str]) -> dict:
    """The checks in ``out``'s results file that this run does not make, each stamped with
    the revision and date of the run that measured it."""
    path = out / "accelerator_check.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    stamp = {
        "revision": old.get("revision", "unknown"),
        "date": old.get("provenance", {}).get("date", "unknown"),
    }
    return {
        name: {"measured": stamp, **old[name]}
        for name in NEEDS_S
        if name in old and name not in rerun
    }


def report_markdown(results: dict) -> str:
    meta = results["provenance"]
    lines = ["# fippure on an accelerator: step loops, Fast FIP speed, memory", ""]
    for key in ("speed_w16", "speed_w64", "speed_w16_bf16"):
        part = results.get(key)
        if not part or "summary" not in part:
            continue
        s = part["summary"]
        lines += [
            f"## Fast FIP against FIP, PreAct-ResNet-18 w{part['width']} "
            f"({'zoo badnets' if part['width'] == 16 else 'random weights'}, "
            f"{part.get('dtype', 'float32')}), {part['steps']} steps per run{_measured(part)}",
            "",
            "| method | tunable parameters | time / step | set-up (SVD, Fbar, TrF0, compile) |",
            "|---|---|---|---|",
        ]
        for m in ("fip", "fast_fip", "fast_fip_rebuilt"):
            name = "fast_fip kernel_form=rebuilt" if m == "fast_fip_rebuilt" else m
            lines.append(
                f"| {name} | {s[m]['tunable_parameters']:,} | {s[m]['step_time_s'] * 1e3:.2f} ms "
                f"| {s[m]['setup_time_s']:.1f} s |"
            )
        verdict = "met" if s["speedup_per_step"] >= 3 else "**missed**"
        lines += [
            "",
            f"- Speed-up per step: **{s['speedup_per_step']:.2f}x** (target >= 3x: {verdict}); "
            f"rebuilt kernels: {s['speedup_per_step_rebuilt']:.2f}x.",
            f"- Whole defense, set-up included: {s['speedup_defense_300_steps']:.2f}x at 300 "
            f"steps, {s['speedup_defense_2000_steps']:.2f}x at 2000.",
            "",
        ]
    full, reduced = results.get("speed_w16", {}), results.get("speed_w16_bf16", {})
    if "summary" in full and "summary" in reduced:
        lines += ["## bfloat16 against float32 (w16, time per step)", ""]
        for m in ("fip", "fast_fip"):
            a, b = full["summary"][m]["step_time_s"], reduced["summary"][m]["step_time_s"]
            lines.append(f"- {m}: {a * 1e3:.2f} ms -> {b * 1e3:.2f} ms ({a / b:.2f}x)")
        lines.append("")
    guard = results.get("guard")
    if guard:
        verdict = "every loop ran" if guard["passed"] else "**failed**"
        lines += [
            "## Step loops under `guard_step_transfers('disallow')` (both directions)"
            + _measured(guard),
            "",
            f"`{guard['command']}`: {verdict} ({guard['summary']}, {guard['wall_s']:.0f} s).",
            "",
        ]
    memory = results.get("memory")
    if memory:
        lines += [f"## Peak device memory of FIP (w64, 12 steps){_measured(memory)}", ""]
        donated, plain = memory.get("donated", {}), memory.get("not_donated", {})
        if "peak_bytes_in_use" in donated and "peak_bytes_in_use" in plain:
            mib = 2**20
            lines += [
                "| carry | peak | step |",
                "|---|---|---|",
                f"| donated (default) | {donated['peak_bytes_in_use'] / mib:.0f} MiB | "
                f"{donated['step_time_s'] * 1e3:.2f} ms |",
                f"| not donated | {plain['peak_bytes_in_use'] / mib:.0f} MiB | "
                f"{plain['step_time_s'] * 1e3:.2f} ms |",
                "",
                f"Parameters: {donated['params_bytes'] / mib:.1f} MiB. Donation saves "
                f"{(plain['peak_bytes_in_use'] - donated['peak_bytes_in_use']) / mib:.0f} MiB "
                "of peak.",
                "",
            ]
            small = memory.get("donated_chunk10", {})
            if "peak_bytes_in_use" in small:
                lines += [
                    f"With `fisher_chunk` 10 instead of 50 (donated): peak "
                    f"{small['peak_bytes_in_use'] / mib:.0f} MiB, step "
                    f"{small['step_time_s'] * 1e3:.2f} ms.",
                    "",
                ]
        else:
            lines += [f"Failed: {json.dumps(memory)[:1500]}", ""]
    for name in results.get("skipped", []):
        lines.append(f"- `{name}`: skipped, not enough of the time budget left.")
    lines += results.get("notes", [])
    lines += [
        "",
        f"Measured by `{meta['command']}` on {meta['machine']}, {meta['date']}, from a copy of "
        f"the working tree at {results['revision']}.",
    ]
    return "\n".join(lines) + "\n"


def run(args) -> None:
    import jax

    from fippure.provenance import provenance

    started = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()}", flush=True)
    meta = provenance()
    if args.revision != "unknown":  # the copied tree's own git metadata may be stale
        meta["git_revision"] = args.revision
    out = pathlib.Path(args.out)
    results = {
        "provenance": meta,
        "revision": args.revision,
        "skipped": [],
        **_kept_results(out, args.checks),
    }
    checks = {
        "speed_w16": lambda: check_speed(args, 16),
        "guard": lambda: check_guard(args),
        "memory": lambda: check_memory(args),
        "speed_w64": lambda: check_speed(args, 64),
        "speed_w16_bf16": lambda: check_speed(args, 16, "bfloat16"),
    }
    for name in args.checks:
        left = args.budget_s - (time.perf_counter() - started)
        if left < NEEDS_S[name]:
            results["skipped"].append(name)
            continue
        begun = time.perf_counter()
        try:
            results[name] = checks[name]()
        except Exception as error:  # a broken check must not lose the others' results
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"[{name}: {time.perf_counter() - begun:.0f} s]", flush=True)
        _write(results, out)
    _write(results, out)
    print(report_markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-clean", help="write a zoo entry's clean set as .npz")
    export.add_argument("--entry", default="badnets")
    export.add_argument("--to", required=True)
    check = sub.add_parser("run", help="the checks, on the accelerator")
    check.add_argument("--clean-set", required=True)
    check.add_argument("--revision", default="unknown", help="the commit the tree was copied at")
    check.add_argument("--budget-s", type=float, default=480)
    check.add_argument("--steps", type=int, default=41)
    check.add_argument("--rounds", type=int, default=2)
    check.add_argument("--checks", nargs="+", default=list(NEEDS_S), choices=list(NEEDS_S))
    check.add_argument("--out", default=str(RESULTS))
    probe = sub.add_parser("memory-probe", help="(internal) one FIP run's peak memory")
    probe.add_argument("--clean-set", required=True)
    probe.add_argument("--width", type=int, default=64)
    probe.add_argument("--steps", type=int, default=12)
    probe.add_argument("--donate", action="store_true")
    probe.add_argument("--fisher-chunk", type=int, default=50)
    args = parser.parse_args()
    {"export-clean": export_clean, "run": run, "memory-probe": memory_probe}[args.command](args)


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "accelerator_check.py")
