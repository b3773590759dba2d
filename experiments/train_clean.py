"""Clean PreAct-ResNet-18 (width 16) on CIFAR-10, and the training throughput of the pipeline.

Launch (resumes an interrupted run; skips training when ``runs/cifar10_w16/clean`` is done, or,
in a checkout without it, when the committed zoo holds the clean model)::

    python experiments/train_clean.py

Expected: test accuracy >= 0.85 after 15 epochs (SPEC section 1, CPU-scale recipe), and the
full data pipeline (on-device gather, crop + flip, normalisation) within 15% of a bare jitted
step on the same batch. Writes ``experiments/results/clean_cifar10_w16.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fippure.data import epoch_permutation, load_dataset
from fippure.losses import cross_entropy
from fippure.models import create_model, init_variables
from fippure.provenance import provenance
from fippure.recipes import train_classifier
from fippure.training import TrainConfig, create_train_state, make_optimizer, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DEFAULT_OUT = str(ROOT / "runs" / "cifar10_w16" / "clean")


def measure_throughput(batch_size: int = 128, rounds: int = 5, steps: int = 20) -> dict:
    """Images/s of a bare jitted SGD step on a fixed device batch vs the training pipeline.

    The two are measured in alternating rounds so that background load hits both alike.
    """
    data = load_dataset("cifar10", "train")
    model = create_model("preact_resnet18", 10, width=16)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    config = TrainConfig(epochs=1, batch_size=batch_size)
    optimizer = make_optimizer(config, 1000)

    @jax.jit
    def bare_step(state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, y), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=stats,
            opt_state=opt_state,
        ), loss

    pipeline_step = make_train_step(model, data.spec, config, optimizer)
    images, labels = jax.device_put(data.images), jax.device_put(data.labels)
    permutation = epoch_permutation(jax.random.key(1), 0, len(data))
    x = jax.random.normal(jax.random.key(2), (batch_size, 32, 32, 3))
    y = jnp.asarray(np.arange(batch_size) % 10, jnp.int32)
    key = jax.random.key(3)
    bare_state = create_train_state(variables, optimizer)
    pipe_state = create_train_state(variables, optimizer)
    bare_state, loss = bare_step(bare_state, x, y)
    pipe_state, metrics = pipeline_step(pipe_state, images, labels, permutation, 0, key)
    jax.block_until_ready((loss, metrics))
    bare, pipe = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            bare_state, loss = bare_step(bare_state, x, y)
        jax.block_until_ready(loss)
        bare.append(steps * batch_size / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(steps):
            pipe_state, metrics = pipeline_step(pipe_state, images, labels, permutation, i, key)
        jax.block_until_ready(metrics)
        pipe.append(steps * batch_size / (time.perf_counter() - start))
    bare_median, pipe_median = statistics.median(bare), statistics.median(pipe)
    return {
        "batch_size": batch_size,
        "rounds": rounds,
        "steps_per_round": steps,
        "bare_step_images_per_s": bare_median,
        "pipeline_images_per_s": pipe_median,
        "pipeline_over_bare": pipe_median / bare_median,
        "bare_rounds": bare,
        "pipeline_rounds": pipe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    report_file = out / "report.json"
    zoo_report = ROOT / "zoo" / "cifar10" / "preact_resnet18_w16" / "clean" / "report.json"
    if report_file.exists() and (out / "metadata.json").exists():
        report = json.loads(report_file.read_text())
    elif args.out == DEFAULT_OUT and zoo_report.exists():
        # A fresh checkout has the committed zoo copy of the same run, not the git-ignored one.
        print(f"train_clean: using the zoo's clean model ({zoo_report.parent})", flush=True)
        report = json.loads(zoo_report.read_text())
    else:
        report = train_classifier(
            dataset="cifar10",
            model="preact_resnet18",
            out=out,
            config=TrainConfig(epochs=args.epochs),
            model_kwargs={"width": 16},
        )
    result = {
        "experiment": "clean preact_resnet18 width 16 on CIFAR-10",
        "test_accuracy": report["test_accuracy"],
        "target_test_accuracy": 0.85,
        "meets_target": report["test_accuracy"] >= 0.85,
        "epochs": report["epochs"],
        "train_examples": report["train_examples"],
        "wall_time_s": report["wall_time_s"],
        "train_images_per_s": report["train_images_per_s"],
        "training_command": report["command"],
        "training_git_revision": report["git_revision"],
        "training_date": report["date"],
        "train_config": report["train_config"],
        "history": report["history"],
    }
    if not args.skip_throughput:
        result["throughput"] = measure_throughput()
    result.update(provenance())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "clean_cifar10_w16.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Clean PreAct-ResNet-18 (width 16), CIFAR-10",
        "",
        f"- test accuracy: **{result['test_accuracy']:.4f}** after {result['epochs']} epochs "
        f"(target >= 0.85: {'met' if result['meets_target'] else 'NOT met'})",
        f"- training wall time: {result['wall_time_s'] / 60:.1f} min, "
        f"{result['train_images_per_s']:.0f} images/s during training",
        f"- training command: `{result['training_command']}`",
    ]
    if "throughput" in result:
        t = result["throughput"]
        lines += [
            f"- bare jitted step: {t['bare_step_images_per_s']:.0f} images/s; full pipeline "
            f"(device gather + crop/flip + normalise): {t['pipeline_images_per_s']:.0f} "
            f"images/s ({100 * t['pipeline_over_bare']:.0f}% of bare)",
        ]
    lines += [
        f"- measured by `{result['command']}` at {result['git_revision']} on "
        f"{result['machine']}, {result['date']}",
    ]
    (RESULTS / "clean_cifar10_w16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from fippure.cli import run_script

    run_script(main, "train_clean.py")
