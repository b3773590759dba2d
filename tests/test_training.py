"""Supervised training: learning, divergence detection, schedules, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.checkpoints import load_checkpoint
from fippure.data import load_dataset
from fippure.errors import CheckpointError, InvalidInputError, NonFiniteLossError
from fippure.inference import accuracy
from fippure.models import create_model, init_variables
from fippure.training import TrainConfig, learning_rate_schedule, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def small_cnn():
    model = create_model("small_cnn", 10, width=8)
    return model, init_variables(model, jax.random.key(0), (8, 8, 1))


def _config(**changes) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, learning_rate=0.2, schedule="cosine", eval_every=1)
    return TrainConfig(**{**base, **changes})


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_training_reduces_the_loss(digits, small_cnn):
    (train_set, test_set), (model, variables) = digits, small_cnn
    before = accuracy(model, variables, test_set.images, test_set.labels, train_set.spec)
    kept = []

    def evaluate(v):
        kept.append(v)  # an evaluator may keep what it is given (e.g. a best-so-far model)
        return {
            "test_accuracy": accuracy(model, v, test_set.images, test_set.labels, test_set.spec)
        }

    final, report = train(
        model, train_set, _config(), variables=variables, evaluate=evaluate, progress=False
    )
    losses = [entry["loss"] for entry in report.history]
    assert len(losses) == 3 and report.steps == 3 * (1437 // 64)
    assert losses[0] > losses[1] > losses[2]
    assert losses[-1] < 0.5 * losses[0]
    assert report.final["test_accuracy"] > max(0.7, before + 0.4)
    assert report.history[-1]["train_accuracy"] > 0.7
    # BatchNorm running statistics were updated along the way.
    assert not np.allclose(final["batch_stats"]["bn1"]["mean"], 0.0)
    _assert_trees_equal(kept[-1], final)  # not deleted by the next steps' donation
    assert not np.allclose(kept[0]["params"]["head"]["kernel"], final["params"]["head"]["kernel"])


@pytest.mark.parametrize("cause", ["nan_parameter", "huge_learning_rate"])
def test_non_finite_loss_is_an_error(digits, small_cnn, cause):
    (train_set, _), (model, variables) = digits, small_cnn
    if cause == "nan_parameter":
        # (NaN *images* would not do: under XLA:CPU the ReLUs map NaN activations to 0.)
        head = {
            **variables["params"]["head"],
            "bias": variables["params"]["head"]["bias"].at[3].set(jnp.nan),
        }
        variables = {**variables, "params": {**variables["params"], "head": head}}
        config = _config(epochs=1, log_every=5)
    else:
        config = _config(epochs=2, learning_rate=1e6, schedule="constant", log_every=5)
    with pytest.raises(NonFiniteLossError, match=r"training loss was (nan|inf) at step \d+ \("):
        train(model, train_set, config, variables=variables, progress=False)


def test_a_last_update_that_diverges_is_an_error(digits, small_cnn, tmp_path, monkeypatch):
    # the loss of a step is measured before its update: an update to non-finite weights in
    # the last step went unnoticed, and the broken weights were returned and saved
    from fippure import training

    (train_set, _), (model, variables) = digits, small_cnn
    made = training.make_train_step

    def diverging(*args, **kwargs):
        step = made(*args, **kwargs)

        def last_step_diverges(state, *inputs):
            state, metrics = step(state, *inputs)
            head = state.params["head"]
            params = {**state.params, "head": {**head, "bias": head["bias"] * jnp.inf}}
            return state.replace(params=params), metrics

        return last_step_diverges

    monkeypatch.setattr(training, "make_train_step", diverging)
    part = train_set.subset(np.arange(64))  # one step
    with pytest.raises(NonFiniteLossError, match="non-finite by step 1"):
        train(model, part, _config(epochs=1), variables=variables, workdir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoints" / "1").exists()  # nothing saved with NaNs in it


def test_schedules():
    config = TrainConfig(epochs=1, learning_rate=0.1, warmup_fraction=0.2)
    onecycle = learning_rate_schedule(config, 100)
    values = np.array([float(onecycle(s)) for s in range(101)])
    assert np.argmax(values) == 20 and values.max() == pytest.approx(0.1)
    assert values[0] < 0.01 and values[100] < 1e-4
    cosine = learning_rate_schedule(TrainConfig(schedule="cosine", learning_rate=0.2), 100)
    assert float(cosine(0)) == pytest.approx(0.2) and float(cosine(50)) == pytest.approx(0.1)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    constant = learning_rate_schedule(TrainConfig(schedule="constant", learning_rate=0.3), 100)
    assert float(constant(0)) == float(constant(99)) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"seed": -1}, r"seed must be in \[0, 4294967296\)"),
        ({"seed": 2**70}, r"seed must be in \[0, 4294967296\)"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov needs a momentum > 0"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**changes)


def test_batch_larger_than_dataset(digits, small_cnn):
    (train_set, _), (model, variables) = digits, small_cnn
    with pytest.raises(InvalidInputError, match="batch_size 2000 exceeds the 1437"):
        train(model, train_set, _config(batch_size=2000), variables=variables, progress=False)


def _without_batch_stats(model, variables):
    return model, {"params": variables["params"]}


def _shapes_of_variables(model, image_shape):
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))


def _five_classes(model, variables):
    model = create_model("small_cnn", 5, width=8)
    return model, _shapes_of_variables(model, (8, 8, 1))


def _rgb_variables(model, variables):
    return model, _shapes_of_variables(model, (8, 8, 3))


@pytest.mark.parametrize(
    ("mismatch", "match"),
    [
        # labels past the last logit made the loss NaN ("lower the learning rate")
        (_five_classes, r"outputs have shape \(5,\) but digits has 10 classes"),
        (_rgb_variables, r"variables do not fit this SmallCNN: .*\(3, 3, 3, 8\)"),
        (_without_batch_stats, "variables do not fit this SmallCNN: .*batch_stats"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(
    digits, small_cnn, mismatch, match
):
    (train_set, _), (model, variables) = digits, small_cnn
    model, variables = mismatch(model, variables)
    with pytest.raises(InvalidInputError, match=match) as error:
        train(model, train_set, _config(epochs=1), variables=variables, progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stop", [0, -3, 2.5])
def test_stop_after_steps_must_be_positive(digits, small_cnn, stop):
    (train_set, _), (model, variables) = digits, small_cnn
    with pytest.raises(InvalidInputError, match="stop_after_steps must be a positive integer"):
        train(
            model, train_set, _config(), variables=variables, progress=False, stop_after_steps=stop
        )


@pytest.mark.parametrize(
    "resumed_with",
    [
        {},
        # how often a run evaluates, logs and saves never shapes its weights, so a killed run
        # may be resumed with other values (e.g. ``--eval-every 1`` to watch it)
        {"eval_every": 1, "log_every": 1, "checkpoint_every": 5},
    ],
)
def test_resume_from_a_stopped_run_in_process(digits, small_cnn, tmp_path, resumed_with):
    """Stopping at a step that is not an epoch boundary, then resuming, changes nothing: not
    the weights, nor the history (the interrupted epoch's mean loss covers all its steps)."""
    (train_set, _), (model, variables) = digits, small_cnn
    config = _config(epochs=2, checkpoint_every=7)

    def evaluate(v):
        return {"head_norm": float(jnp.linalg.norm(v["params"]["head"]["kernel"]))}

    whole, expected = train(
        model, train_set, config, variables=variables, evaluate=evaluate, progress=False
    )
    partial, report = train(
        model,
        train_set,
        config,
        variables=variables,
        workdir=tmp_path,
        evaluate=evaluate,
        progress=False,
        stop_after_steps=30,
    )
    assert report.resumed_from_step == 0
    resumed, report = train(
        model,
        train_set,
        dataclasses.replace(config, **resumed_with),
        variables=variables,
        workdir=tmp_path,
        evaluate=evaluate,
        progress=False,
    )
    assert report.resumed_from_step == 30
    assert report.history == expected.history and report.final == expected.final
    _assert_trees_equal(resumed, whole)
    # a finished run called again trains nothing and reports what it reported
    _, again = train(
        model, train_set, config, variables=variables, workdir=tmp_path, progress=False
    )
    assert again.resumed_from_step == 2 * 22
    assert again.history == expected.history and again.final == expected.final
    assert not jnp.array_equal(
        partial["params"]["head"]["kernel"], whole["params"]["head"]["kernel"]
    )


@pytest.mark.parametrize("lost", [[28], [21, 28]])
def test_a_run_killed_while_orbax_finished_a_save_resumes_from_the_one_before(
    digits, small_cnn, tmp_path, lost
):
    """Orbax writes a checkpoint in the background, and ``history.json`` is written when the
    save begins: a kill in between leaves the file one save ahead of the checkpoints (here the
    save at step 28, in epoch 2, is lost and the run resumes at step 21, in epoch 1; or both
    are lost and it starts afresh). The resumed run still reports what an uninterrupted run
    reports, with no epoch twice and the unfinished epoch's mean over all its steps."""
    (train_set, _), (model, variables) = digits, small_cnn
    config = _config(epochs=2, checkpoint_every=7)
    whole, expected = train(model, train_set, config, variables=variables, progress=False)
    train(
        model,
        train_set,
        config,
        variables=variables,
        workdir=tmp_path,
        progress=False,
        stop_after_steps=28,
    )
    for step in lost:  # as if the kill came before orbax finished writing them
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    resumed, report = train(
        model, train_set, config, variables=variables, workdir=tmp_path, progress=False
    )
    assert report.resumed_from_step == (0 if 21 in lost else 21)
    assert report.history == expected.history and report.final == expected.final
    _assert_trees_equal(resumed, whole)


def test_workdir_of_another_run_is_an_error(digits, small_cnn, tmp_path):
    (train_set, _), (model, variables) = digits, small_cnn
    train(
        model,
        train_set,
        _config(epochs=1),
        variables=variables,
        workdir=tmp_path,
        progress=False,
        stop_after_steps=2,
    )
    with pytest.raises(CheckpointError, match="holds a run with a different config"):
        train(
            model,
            train_set,
            _config(epochs=1, learning_rate=0.01),
            variables=variables,
            workdir=tmp_path,
            progress=False,
        )
    other_model = create_model("small_cnn", 10, width=4)
    with pytest.raises(CheckpointError, match="different model"):
        train(
            other_model,
            train_set,
            _config(epochs=1),
            variables=init_variables(other_model, jax.random.key(0), (8, 8, 1)),
            workdir=tmp_path,
            progress=False,
        )


# --- resume after a real kill -------------------------------------------------------------

EPOCHS, BATCH = 20, 32
STEPS_PER_EPOCH = (1437 - 14) // BATCH  # the 1% clean set (14 images) is held out


def _command(out: pathlib.Path) -> list[str]:
    return [
        sys.executable, "-m", "fippure.cli", "train", "--dataset", "digits",
        "--model", "small_cnn", "--width", "8", "--epochs", str(EPOCHS),
        "--batch-size", str(BATCH), "--lr", "0.05", "--eval-every", "1000", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _checkpoint_steps(out: pathlib.Path) -> list[int]:
    directory = out / "train" / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = _environment()
    uninterrupted = subprocess.Popen(
        _command(reference), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    victim = subprocess.Popen(
        _command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 900
    while not any(step >= 3 * STEPS_PER_EPOCH for step in _checkpoint_steps(killed)):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after three epochs in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    last = max(_checkpoint_steps(killed))
    assert 3 * STEPS_PER_EPOCH <= last < EPOCHS * STEPS_PER_EPOCH
    assert not (killed / "metadata.json").exists()  # killed before the final checkpoint

    resumed = subprocess.run(_command(killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    output = uninterrupted.communicate(timeout=900)[0].decode()
    assert uninterrupted.returncode == 0, output[-2000:]

    report = json.loads((killed / "report.json").read_text())
    assert report["resumed_from_step"] >= last  # it resumed instead of starting over
    assert [entry["epoch"] for entry in report["history"]] == list(range(1, EPOCHS + 1))
    assert json.loads((reference / "report.json").read_text())["resumed_from_step"] == 0
    a, b = load_checkpoint(killed), load_checkpoint(reference)
    _assert_trees_equal(a.variables, b.variables)
    assert a.metadata["clean_indices"] == b.metadata["clean_indices"]
    assert report["test_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("attack_name", "options"),
    [("badnets", {}), ("wanet", {}), ("input_aware", {"mask_epochs": 1}),
     ("lira", {"finetune_epochs": 0})],
)  # fmt: skip
def test_a_poisoning_transform_is_not_compiled_in_as_constants(digits, attack_name, options):
    # the plan (one entry per training example) and the trigger state were baked into the
    # compiled step: a program that grew with the dataset, one per plan or seed
    import warnings

    from fippure.attacks import AttackContext, make_attack, make_poison_plan

    (train_set, _) = digits
    attack = make_attack(attack_name, **options)
    plan = make_poison_plan(train_set.labels, ratio=0.1, num_classes=10)
    context = AttackContext(train_set, plan, train_set.spec, jax.random.key(0), progress=False)
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(0), train_set.spec.image_shape)
    state = attack.init_state(jax.random.key(1), train_set.spec)
    previous = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", 512)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*constants were captured")
            config = _config(epochs=1, batch_size=128)
            attack.train_backdoored(state, context, model, variables, config)
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", previous)


def test_the_poisoning_transform_sees_the_batch_before_augmentation(digits, small_cnn):
    """SPEC section 1: the trigger is stamped on the stored image, then the batch is cropped
    and flipped like any other (a trigger stamped after the crop would never move)."""
    (train_set, _), (model, variables) = digits, small_cnn
    seen = []

    def record(x, rows):
        stored = train_set.images[np.asarray(rows)].astype(np.float32) / 255.0
        seen.append(bool(np.allclose(np.asarray(x), stored, atol=1e-6)))

    def spy(key, x, y, rows):
        jax.debug.callback(record, x, rows)
        return x, y

    train(
        model, train_set, _config(epochs=1, augment=True), variables=variables,
        batch_transform=spy, stop_after_steps=3, progress=False,
    )  # fmt: skip
    assert seen == [True, True, True]


def test_bfloat16_variables_train_with_bfloat16_statistics(digits, small_cnn):
    """Flax blends a float32 batch mean into bfloat16 running statistics: they had come back
    float32, changing the step's carry after its first call."""
    (train_set, _), (model, variables) = digits, small_cnn
    low = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
    final, _ = train(
        model, train_set.subset(np.arange(128)), _config(epochs=1), variables=low, progress=False
    )
    assert {x.dtype for x in jax.tree_util.tree_leaves(final)} == {jnp.dtype(jnp.bfloat16)}
