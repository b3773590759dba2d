"""Which computation of FIP sets its memory peak at full width? XLA's compile-time estimate.

On one H200, FIP on PreAct-ResNet-18 w64 peaked at 6.1 GB with or without its step's carry
donated (``accelerator_check.md``), so the peak is set by something other than the carry. The
candidates are the diagonal Fisher ``Fbar`` (per-example gradients, ``fisher_chunk`` of them
at a time) and the step itself (activations of a batch of 128 in BatchNorm-train mode, the
linearisation behind the trace term, and their gradients). This script compiles each for the
backend it runs on, without running it, and reports XLA's ``memory_analysis()``: the
temporary buffers a call needs besides its arguments and outputs. On the CPU this is XLA:CPU's
plan, not a GPU's (cuDNN workspaces and GPU fusion differ), so it ranks the candidates rather
than predicting the GPU's bytes::

    python experiments/memory_sources.py [--width 64] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
MIB = 2**20


def analyse(width: int, batch: int, chunks: list[int]) -> dict:
    import jax
    import jax.numpy as jnp

    from fippure.curvature import fisher
    from fippure.models import create_model, init_variables

    model = create_model("preact_resnet18", 10, width=width)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    params, stats = variables["params"], variables["batch_stats"]

    def per_example(p, data):
        images, labels = data
        logits = model.apply({"params": p, "batch_stats": stats}, images)
        return -jax.nn.log_softmax(logits)[jnp.arange(images.shape[0]), labels]

    def sizes(compiled) -> dict:
        m = compiled.memory_analysis()
        return {
            "temp_mib": m.temp_size_in_bytes / MIB,
            "argument_mib": m.argument_size_in_bytes / MIB,
            "output_mib": m.output_size_in_bytes / MIB,
        }

    out = {
        "width": width,
        "batch": batch,
        "params_mib": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / MIB,
        "fisher_diagonal": {},
    }
    clean = (jnp.zeros((500, 32, 32, 3)), jnp.zeros(500, jnp.int32))
    loss_fn = fisher.as_partial(per_example)
    for chunk in chunks:
        rows = jnp.arange(chunk)
        compiled = (
            jax.jit(fisher._chunk_squared_gradients)
            .lower(loss_fn, params, clean, rows, rows < 500)
            .compile()
        )
        out["fisher_diagonal"][str(chunk)] = sizes(compiled)
        print(f"Fbar chunk {chunk}: {out['fisher_diagonal'][str(chunk)]}", flush=True)

    images, labels = jnp.zeros((batch, 32, 32, 3)), jnp.zeros(batch, jnp.int32)

    def objective(p, key):
        """FIP's step objective: CE in BN-train mode plus the empirical-Fisher trace."""
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])
        trace = fisher.empirical_fisher_trace(per_example, p, (images, labels), key)
        return ce + trace

    def cross_entropy_only(p, key):
        del key
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])

    for name, fn in (("step_gradient", objective), ("cross_entropy_gradient", cross_entropy_only)):
        compiled = jax.jit(jax.grad(fn)).lower(params, jax.random.key(0)).compile()
        out[name] = sizes(compiled)
        print(f"{name}: {out[name]}", flush=True)
    return out


def report_markdown(result: dict, meta: dict) -> str:
    from fippure.provenance import measured_by

    def row(name: str, part: dict) -> str:
        return (
            f"| {name} | {part['temp_mib']:,.0f} MiB | {part['argument_mib']:,.0f} MiB | "
            f"{part['output_mib']:,.0f} MiB |"
        )

    lines = [
        f"# FIP's memory at PreAct-ResNet-18 w{result['width']}: XLA's compile-time estimate",
        "",
        "Temporary buffers each compiled computation needs besides its arguments and outputs "
        f"(`memory_analysis()`; parameters: {result['params_mib']:.1f} MiB). Compiled for "
        f"{meta['machine']}: XLA:CPU's plan, which ranks the candidates but does not predict "
        "a GPU's bytes.",
        "",
        "| computation | temporary | arguments | outputs |",
        "|---|---|---|---|",
    ]
    for chunk, part in result["fisher_diagonal"].items():
        lines.append(row(f"Fbar, one chunk of {chunk} per-example gradients", part))
    lines.append(
        row(f"FIP step gradient (CE + trace, batch {result['batch']})", result["step_gradient"])
    )
    lines.append(
        row(f"CE gradient alone (batch {result['batch']})", result["cross_entropy_gradient"])
    )
    step = result["step_gradient"]["temp_mib"]
    fbar = result["fisher_diagonal"].get("50", {}).get("temp_mib")
    if fbar is not None:
        verdict = (
            "the step, not Fbar, sets FIP's peak: a smaller `fisher_chunk` would not lower it, "
            "a smaller `batch_size` would"
            if step > fbar
            else "Fbar, not the step, sets FIP's peak: a smaller `fisher_chunk` would lower it"
        )
        lines += [
            "",
            f"- The step's gradient needs {step / fbar:.1f}x the temporary memory of an Fbar "
            f"chunk of 50 ({step:,.0f} against {fbar:,.0f} MiB). On this estimate {verdict}.",
        ]
    lines += ["", measured_by(meta)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", default="50,10")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from fippure.provenance import provenance

    result = analyse(args.width, args.batch, [int(c) for c in args.chunks.split(",")])
    meta = provenance()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_sources.json").write_text(json.dumps({"provenance": meta, **result}, indent=1))
    (out / "memory_sources.md").write_text(report_markdown(result, meta))
    print(report_markdown(result, meta))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "memory_sources.py")
