"""The phased training loop of jointly trained attacks: order, evaluation, exact resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks.joint import Phase, epoch_means, run_phases, unit_batch
from fippure.data.sources import load_dataset
from fippure.errors import CheckpointError, NonFiniteLossError
from fippure.progress_records import checkpoint_manager

BATCH = 128


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _phases(epochs=(1, 2)):
    """Two toy phases whose carry depends on every batch, key and phase."""

    def make_step(scale):
        @jax.jit
        def step(carry, images, labels, permutation, index, key):
            x, y, _ = unit_batch(images, labels, permutation, index, BATCH)
            noise = jax.random.normal(key, ())
            value = scale * jnp.mean(x) + 0.01 * noise + 0.001 * jnp.sum(y)
            carry = {"w": 0.9 * carry["w"] + value, "steps": carry["steps"] + 1}
            return carry, {"loss": value}

        return step

    return [
        Phase("first", epochs[0], make_step(1.0), trains_classifier=False),
        Phase("second", epochs[1], make_step(-2.0)),
    ]


def _carry():
    return {"w": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}


def _run(digits, workdir=None, **kw):
    return run_phases(
        _phases(),
        _carry(),
        digits,
        batch_size=BATCH,
        seed=3,
        fingerprint={"test": 1},
        workdir=workdir,
        evaluate=lambda carry: {"w": float(carry["w"])},
        eval_every=1,
        progress=False,
        **kw,
    )


def test_phases_run_in_order_and_evaluate_classifier_epochs(digits):
    carry, report = _run(digits)
    steps_per_epoch = len(digits) // BATCH
    assert int(carry["steps"]) == 3 * steps_per_epoch == report.steps
    assert report.epochs == 2  # only the second phase trains the classifier
    assert [h["phase"] for h in report.history] == ["first", "second", "second"]
    assert [h.get("classifier_epoch") for h in report.history] == [None, 1, 2]
    assert "w" not in report.history[0] and "w" in report.history[2]
    assert report.final["w"] == pytest.approx(float(carry["w"]))


@pytest.mark.parametrize("stop", [5, 11, 22])  # inside phase 1, at its end, inside phase 2
def test_interrupted_run_resumes_to_the_same_result(digits, tmp_path, stop):
    reference, expected = _run(digits)
    partial, report = _run(digits, tmp_path, stop_after_steps=stop)
    assert int(partial["steps"]) == stop
    resumed, report = _run(digits, tmp_path)
    assert report.resumed_from_step == stop
    assert int(resumed["steps"]) == int(reference["steps"])
    np.testing.assert_allclose(float(resumed["w"]), float(reference["w"]), rtol=1e-6)
    # the epoch the run stopped in is averaged over all its steps, as without the stop
    assert report.history == expected.history
    assert report.final == expected.final
    assert report.total_wall_time_s >= report.wall_time_s


def test_a_finished_run_is_not_repeated(digits, tmp_path):
    first, expected = _run(digits, tmp_path)
    again, report = _run(digits, tmp_path)
    assert report.resumed_from_step == report.steps
    assert float(again["w"]) == float(first["w"])
    assert report.history == expected.history and report.final == expected.final


def test_another_run_in_the_same_workdir_is_refused(digits, tmp_path):
    _run(digits, tmp_path, stop_after_steps=2)
    with pytest.raises(CheckpointError, match="different test"):
        run_phases(
            _phases(),
            _carry(),
            digits,
            batch_size=BATCH,
            seed=3,
            fingerprint={"test": 2},
            workdir=tmp_path,
            progress=False,
        )


def test_a_rate_reported_as_correct_and_count_is_divided_once_per_epoch():
    # a mean of per-step ratios counted a step without a poisoned row as 0
    totals = {
        "loss": jnp.asarray(6.0),
        "backdoor_accuracy_correct": jnp.asarray(13),
        "backdoor_accuracy_count": jnp.asarray(13),
    }
    assert epoch_means(totals, 3) == {"loss": 2.0, "backdoor_accuracy": 1.0}
    none = epoch_means({**totals, "backdoor_accuracy_count": jnp.asarray(0)}, 3)
    assert np.isnan(none["backdoor_accuracy"])


def test_the_evaluator_may_keep_what_it_is_given_though_the_steps_donate(digits):
    # it got the live carry, which the next step deleted ("Array has been deleted")
    donating = [
        Phase(p.name, p.epochs, jax.jit(p.step, donate_argnums=0), p.trains_classifier)
        for p in _phases()
    ]
    kept = []

    def evaluate(carry):
        kept.append(carry)
        return {}

    run_phases(
        donating, _carry(), digits, batch_size=BATCH, seed=3, fingerprint={"test": 1},
        evaluate=evaluate, eval_every=1, progress=False,
    )  # fmt: skip
    assert len(kept) == 2 and all(np.isfinite(float(c["w"])) for c in kept)


def test_checkpoint_every_saves_inside_an_epoch_and_resumes_there(digits, tmp_path):
    # the joint attacks took TrainConfig.checkpoint_every and saved at epoch ends only
    reference, expected = _run(digits)
    _, stopped = _run(digits, tmp_path, checkpoint_every=3, stop_after_steps=7)
    manager = checkpoint_manager(tmp_path)
    assert manager.all_steps() == [6, 7]  # the last two saves: every 3 steps and the stop
    manager.close()
    carry, report = _run(digits, tmp_path, checkpoint_every=3)
    assert report.resumed_from_step == 7
    np.testing.assert_allclose(float(carry["w"]), float(reference["w"]), rtol=1e-6)
    assert [h["loss"] for h in report.history] == pytest.approx(
        [h["loss"] for h in expected.history]
    )


def test_a_carry_that_becomes_non_finite_is_an_error(digits, tmp_path):
    # a step's loss is read before its update: an overflow in the last update went unnoticed
    @jax.jit
    def overflowing(carry, images, labels, permutation, index, key):
        last = carry["steps"] == len(digits) // BATCH - 1
        w = jnp.where(last, jnp.inf, carry["w"])
        return {"w": w, "steps": carry["steps"] + 1}, {"loss": carry["w"]}

    phases = [Phase("only", 1, overflowing)]
    with pytest.raises(NonFiniteLossError, match="non-finite by step"):
        run_phases(
            phases, {"w": jnp.ones(()), "steps": jnp.zeros((), jnp.int32)}, digits,
            batch_size=BATCH, seed=0, fingerprint={}, workdir=tmp_path, progress=False,
        )  # fmt: skip
    assert checkpoint_manager(tmp_path).all_steps() == []  # nothing saved with NaNs in it


def test_a_plain_step_is_compiled_with_its_closed_over_arrays_as_an_argument(digits):
    # the joint attacks' steps closed over the poisoning plan (one entry per training
    # example), which was baked into each compiled program
    import warnings

    plan = jnp.arange(len(digits), dtype=jnp.float32)

    def step(carry, images, labels, permutation, index, key):
        _, _, rows = unit_batch(images, labels, permutation, index, BATCH)
        return {"w": carry["w"] + jnp.sum(plan[rows]), "steps": carry["steps"] + 1}, {
            "loss": carry["w"]
        }

    previous = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", 512)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*constants were captured")
            carry, _ = run_phases(
                [Phase("only", 1, step)], _carry(), digits, batch_size=BATCH, seed=0,
                fingerprint={}, progress=False,
            )  # fmt: skip
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", previous)
    assert int(carry["steps"]) == len(digits) // BATCH
