"""Cost of curvature products relative to a plain gradient step (issue 4, "Must show").

Launch (from the repository root; about 10 minutes on 2 shared CPU cores):

    python experiments/curvature_cost.py

Measures, in one run, on ``preact_resnet18`` width 16 with a batch of 128 CIFAR-sized inputs:

- ``grad_step``: a plain SGD step (cross-entropy, BatchNorm in train mode, momentum update);
- ``ggn_vp``: one GGN (= true Fisher) vector product, one-shot (``jax.linearize`` of the
  logits, closed-form logit Hessian, ``jax.linear_transpose``), eval mode;
  ``ggn_vp_jvp_vjp`` is the naive ``jax.jvp`` + ``jax.vjp`` form (two forward passes) and
  ``ggn_vp_reused`` one product from an operator linearised beforehand (amortised cost);
- ``hvp``: one Hessian-vector product (``jax.jvp`` of ``jax.grad``), eval mode, and
  ``hvp_reused`` from a linearised operator;
- ``trace_step``: one FIP step with the trace penalty, ``CE (train mode) + eta * TrF_hat``
  (eval mode, SPEC section 2's choice; 1 Rademacher probe), differentiated and applied;
  ``trace_step_shared`` evaluates both terms on one eval-mode pass (the CE is the mean of the
  per-example losses that the jvp's primal already holds);
  ``trace_step_half`` takes the penalty on half of the batch (an unbiased, noisier estimate);
- the Lanczos loop drivers (``"python"`` vs ``"fori"``) on the HVP operator;
- the gradient of the trace penalty with 1 and 4 probes, looped (the library default) vs
  ``jax.vmap``-ed: compile and run time.

Each function is compiled first, then the functions are timed round-robin (one call of each
per round, so contention from other jobs hits them alike) and the median over rounds is kept;
ratios are also taken within each round and their median reported. Inputs are random (timings
do not depend on the values). Writes ``experiments/results/curvature_cost.json`` and ``.md``.
Result (experiments/results/curvature_cost.md, 2 contended CPU cores): GGN-vector product
1.2x a gradient step (aim <= 1.5x: met); HVP 2.0x; the SPEC-default trace-penalty step 3.3x
(aim <= 2.5x: missed, because CE in train mode and the penalty in eval mode are two separate
network passes and the penalty's reverse-over-forward gradient alone costs about 2x); the
shared eval-mode pass 2.1x, the penalty on half the batch 2.2x, and the penalty every 5th
step 1.5x amortised all meet it. Lanczos: ``lax.fori_loop`` about 50x slower than the
Python-driven loop.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from fippure.curvature import (
    empirical_fisher_trace,
    ggn_vp,
    hvp,
    lanczos,
    make_ggn_operator,
    make_hvp_operator,
    softmax_hessian_vp,
)
from fippure.curvature.probes import rademacher_like
from fippure.models import create_model, init_variables
from fippure.provenance import provenance

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def build(width: int, batch_size: int, seed: int = 0):
    model = create_model("preact_resnet18", 10, width=width)
    variables = init_variables(model, jax.random.key(seed), (32, 32, 3))
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    images = jax.random.normal(keys[0], (batch_size, 32, 32, 3))
    labels = jax.random.randint(keys[1], (batch_size,), 0, 10)
    return model, variables, images, labels, keys[2]


def make_functions(model, variables, eta: float = 1e-3):
    optimizer = optax.sgd(0.005, momentum=0.95)
    stats = variables["batch_stats"]

    def eval_logits(params, x):
        return model.apply({"params": params, "batch_stats": stats}, x, train=False)

    def per_example(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(eval_logits(params, x), y)

    def train_ce(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def grad_step(params, batch_stats, opt_state, x, y, key):
        del key
        (loss, new_stats), grads = jax.value_and_grad(train_ce, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    @jax.jit
    def trace_step(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            ce, new_stats = train_ce(p, batch_stats, x, y)
            penalty = empirical_fisher_trace(per_example, p, (x, y), key, 1)
            return ce + eta * penalty, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    @jax.jit
    def trace_step_half(params, batch_stats, opt_state, x, y, key):
        half = x.shape[0] // 2

        def loss_fn(p):
            ce, new_stats = train_ce(p, batch_stats, x, y)
            penalty = empirical_fisher_trace(per_example, p, (x[:half], y[:half]), key, 1)
            return ce + eta * penalty, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    @jax.jit
    def trace_step_shared(params, batch_stats, opt_state, x, y, key):
        def loss_fn(p):
            v = rademacher_like(key, p)
            losses, u = jax.jvp(lambda q: per_example(q, (x, y)), (p,), (v,))
            return jnp.mean(losses) + eta * jnp.mean(u**2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def fvp(params, x, v):
        return ggn_vp(lambda p, b: eval_logits(p, b), params, x, v)

    @jax.jit
    def fvp_jvp_vjp(params, x, v):
        logits, tangents = jax.jvp(lambda p: eval_logits(p, x), (params,), (v,))
        _, pullback = jax.vjp(lambda p: eval_logits(p, x), params)
        return pullback(softmax_hessian_vp(logits, tangents) / logits.shape[0])[0]

    @jax.jit
    def hvp_one(params, x, y, v):
        return hvp(lambda p, b: jnp.mean(per_example(p, b)), params, (x, y), v)

    build_ggn = jax.jit(lambda params, x: make_ggn_operator(eval_logits, params, x))
    build_hvp = jax.jit(
        lambda params, x, y: make_hvp_operator(
            lambda p, b: jnp.mean(per_example(p, b)), params, (x, y)
        )
    )
    apply_operator = jax.jit(lambda op, v: op(v))
    return {
        "optimizer": optimizer,
        "grad_step": grad_step,
        "trace_step": trace_step,
        "trace_step_shared": trace_step_shared,
        "trace_step_half": trace_step_half,
        "per_example": per_example,
        "fvp": fvp,
        "fvp_jvp_vjp": fvp_jvp_vjp,
        "hvp": hvp_one,
        "build_ggn": build_ggn,
        "build_hvp": build_hvp,
        "apply_operator": apply_operator,
    }


def block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    block(fn(*args))
    return time.perf_counter() - start


def measure_products(model, variables, images, labels, key, repeats: int) -> dict:
    fns = make_functions(model, variables)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = fns["optimizer"].init(params)
    vector = rademacher_like(key, params)
    ggn_op = block(fns["build_ggn"](params, images))
    hvp_op = block(fns["build_hvp"](params, images, labels))
    step_args = (params, stats, opt_state, images, labels, key)
    calls = {
        "grad_step": lambda: fns["grad_step"](*step_args),
        "ggn_vp": lambda: fns["fvp"](params, images, vector),
        "ggn_vp_jvp_vjp": lambda: fns["fvp_jvp_vjp"](params, images, vector),
        "ggn_vp_reused": lambda: fns["apply_operator"](ggn_op, vector),
        "hvp": lambda: fns["hvp"](params, images, labels, vector),
        "hvp_reused": lambda: fns["apply_operator"](hvp_op, vector),
        "trace_step": lambda: fns["trace_step"](*step_args),
        "trace_step_shared": lambda: fns["trace_step_shared"](*step_args),
        "trace_step_half": lambda: fns["trace_step_half"](*step_args),
    }
    compile_s = {}
    for name, call in calls.items():
        compile_s[name] = timed(call)  # first call: compile + run
        timed(call)  # warm
    rounds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            rounds[name].append(timed(call))
    base = rounds["grad_step"]
    out = {}
    for name, times in rounds.items():
        out[name] = {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "ratio_of_medians": statistics.median(times) / statistics.median(base),
            "median_of_round_ratios": statistics.median(
                t / b for t, b in zip(times, base, strict=True)
            ),
            "first_call_s": compile_s[name],
            "times_ms": [round(1e3 * t, 2) for t in times],
        }
    return out


def measure_lanczos(model, variables, images, labels, key, steps: int, repeats: int) -> dict:
    fns = make_functions(model, variables)
    params = variables["params"]
    operator = block(fns["build_hvp"](params, images, labels))
    out = {}
    for loop in ("python", "fori"):
        first = timed(lambda loop=loop: lanczos(operator, params, key, steps, loop=loop))
        times = [
            timed(lambda loop=loop: lanczos(operator, params, key, steps, loop=loop))
            for _ in range(repeats)
        ]
        out[loop] = {
            "first_call_s": first,
            "median_s": statistics.median(times),
            "per_step_ms": 1e3 * statistics.median(times) / steps,
            "times_s": [round(t, 3) for t in times],
        }
    out["fori_over_python"] = out["fori"]["median_s"] / out["python"]["median_s"]
    out["steps"] = steps
    return out


def measure_probes(model, variables, images, labels, key, repeats: int) -> dict:
    """Gradient of the trace penalty with K probes: looped (default) vs ``jax.vmap``-ed."""
    per_example = make_functions(model, variables)["per_example"]
    params = variables["params"]
    out = {}
    for num_probes in (1, 4):
        for vmap in (False, True):
            fn = jax.jit(
                jax.grad(
                    lambda p, k, n=num_probes, v=vmap: empirical_fisher_trace(
                        per_example, p, (images, labels), k, n, vmap_probes=v
                    )
                )
            )
            start = time.perf_counter()
            compiled = fn.lower(params, key).compile()
            compile_s = time.perf_counter() - start
            timed(compiled, params, key)
            times = [timed(compiled, params, key) for _ in range(repeats)]
            out[f"{num_probes}_probes_{'vmap' if vmap else 'loop'}"] = {
                "compile_s": compile_s,
                "median_ms": 1e3 * statistics.median(times),
                "times_ms": [round(1e3 * t, 1) for t in times],
            }
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_note(before: list[float] | None, after: list[float] | None) -> str:
    """What the load averages say about the timings. The benchmark itself keeps up to every
    core busy, so a 1-minute load beyond ``cores + 0.5`` means that other jobs ran too."""
    cores = os.cpu_count() or 1
    loads = [x[0] for x in (before, after) if x]
    if not loads:
        return "The load average was not available; the timings' background load is unknown."
    busiest = max(loads)
    if busiest > cores + 0.5:
        return (
            f"The 1-minute load average reached {busiest:.2f} on {cores} cores, so other jobs "
            "shared the machine: absolute times are inflated and noisy. The round-robin order "
            "and the per-round ratios keep the ratios comparable."
        )
    return (
        f"The 1-minute load average was at most {busiest:.2f} on {cores} cores before and "
        "after the run."
    )


def write_markdown(result: dict, path: pathlib.Path) -> None:
    p = result["products"]
    rows = [
        ("plain gradient step (train-mode CE, SGD)", "grad_step"),
        ("GGN/Fisher-vector product, one-shot (linearize + transpose)", "ggn_vp"),
        ("GGN-vector product, naive jvp + vjp", "ggn_vp_jvp_vjp"),
        ("GGN-vector product from a linearised operator", "ggn_vp_reused"),
        ("Hessian-vector product, one-shot", "hvp"),
        ("Hessian-vector product from a linearised operator", "hvp_reused"),
        ("trace-penalty step, CE train mode + TrF eval mode (SPEC)", "trace_step"),
        ("trace-penalty step, one shared eval-mode pass", "trace_step_shared"),
        ("trace-penalty step, TrF on half the batch", "trace_step_half"),
    ]
    lines = [
        "# Curvature cost relative to a plain gradient step",
        "",
        f"`{result['command']}` at `{result['git_revision']}` on {result['machine']}, "
        f"{result['date']}.",
        "",
        f"preact_resnet18 width {result['width']}, batch {result['batch_size']}, "
        f"{result['repeats']} round-robin rounds after compilation; "
        f"load average before/after: {result['load_average_before']} / "
        f"{result['load_average_after']}.",
        "",
        "| measurement | median ms | x grad step (median of round ratios) |",
        "|---|---|---|",
    ]
    for label, name in rows:
        lines.append(
            f"| {label} | {p[name]['median_ms']:.1f} | {p[name]['median_of_round_ratios']:.2f} |"
        )
    lines += [
        "",
        "Trace-penalty step every 5th step (SPEC section 2's option), amortised: "
        f"{result['trace_step_every_5_amortised']:.2f}x a gradient step.",
        "",
        "Gradient of the trace penalty, looped vs vmapped probes (compile s / run ms):",
        "",
    ]
    for name, row in result["probes"].items():
        lines.append(f"- {name}: {row['compile_s']:.1f} s / {row['median_ms']:.0f} ms")
    lz = result["lanczos_loop"]
    lines += [
        "",
        f"Lanczos on the HVP operator, {lz['steps']} steps: python-driven "
        f"{lz['python']['per_step_ms']:.0f} ms/step, lax.fori_loop "
        f"{lz['fori']['per_step_ms']:.0f} ms/step (fori / python = {lz['fori_over_python']:.2f}).",
        "",
        result["note"],
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--lanczos-steps", type=int, default=4)
    parser.add_argument("--lanczos-repeats", type=int, default=1)
    parser.add_argument("--probe-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "curvature_cost.json"))
    args = parser.parse_args()

    before = load_average()
    model, variables, images, labels, key = build(args.width, args.batch_size)
    products = measure_products(model, variables, images, labels, key, args.repeats)
    lanczos_loop = measure_lanczos(
        model, variables, images, labels, key, args.lanczos_steps, args.lanczos_repeats
    )
    probes = measure_probes(model, variables, images, labels, key, args.probe_repeats)
    after = load_average()
    trace_ratio = products["trace_step"]["median_of_round_ratios"]
    result = {
        "width": args.width,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "products": products,
        "trace_step_every_5_amortised": (4 + trace_ratio) / 5,
        "lanczos_loop": lanczos_loop,
        "probes": probes,
        "load_average_before": before,
        "load_average_after": after,
        "aims": {"ggn_vp": 1.5, "trace_step": 2.5},
        "note": load_note(before, after),
        **provenance(),
    }
    out = pathlib.Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))
    summary = {k: round(v["median_of_round_ratios"], 2) for k, v in products.items()}
    print(json.dumps({"ratios": summary, "fori_over_python": lanczos_loop["fori_over_python"]}))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "curvature_cost.py")
