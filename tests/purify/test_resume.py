"""A defense killed mid-run resumes from its saved progress and ends where an uninterrupted
run ends; progress of another run is refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from clean_sets import random_digits_clean_set

from fippure.errors import CheckpointError, InvalidInputError
from fippure.models import create_model, init_variables
from fippure.purify import DEFENSES, make_config
from fippure.purify.resume import Checkpointing
from fippure.purify.runner import PROGRESS, run_defense

STEPS = 6
#: A few steps of each step loop on a width-4 digits CNN (NFT masks its two BatchNorms).
#: Fast FIP runs FIP's loop over other tunables, and FT-SAM FT's, so they are not repeated.
OVERRIDES = {
    "fip": {"average_last": "3", "trace_every": "4"},  # the trace at steps 1 and 5
    "nft": {"mask_pattern": r"^bn\d+$"},
    "ngf": {"refresh_every": "4"},
    "ft": {},
}


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    clean = random_digits_clean_set(per_class=4)
    model = create_model("small_cnn", 10, width=4)
    return model, init_variables(model, jax.random.key(1), clean.spec.image_shape), clean


def _config(defense, **extra):
    values = {"steps": str(STEPS), "batch_size": "16", "log_every": "2"}
    return make_config(defense, {**values, **OVERRIDES[defense], **extra})


def _kill_after(step):
    def observer(done, variables):
        del variables
        if done == step:
            raise _Killed

    return observer


@pytest.mark.parametrize("defense", sorted(OVERRIDES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(defense, tiny, tmp_path):
    model, variables, clean = tiny
    purify, config, key = DEFENSES[defense].purify, _config(defense), jax.random.key(5)
    want, want_report = purify(model, variables, clean, config, key, progress=False)

    saving = Checkpointing(tmp_path / "progress", every=2)
    with pytest.raises(_Killed):  # dies after step 3; the last save holds step 2
        purify(
            model,
            variables,
            clean,
            config,
            key,
            progress=False,
            observer=_kill_after(3),
            observe_every=1,
            checkpointing=saving,
        )
    got, report = purify(model, variables, clean, config, key, progress=False, checkpointing=saving)

    assert report.resumed_from_step == 2 and want_report.resumed_from_step == 0
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want
    )
    # every entry, including FIP's last trace and its step at step 4 (after the resume, before
    # the next traced step)
    assert [sorted(p) for p in report.loss_curve] == [sorted(p) for p in want_report.loss_curve]
    for entry, wanted in zip(report.loss_curve, want_report.loss_curve, strict=True):
        np.testing.assert_allclose([entry[k] for k in wanted], list(wanted.values()), rtol=1e-6)


def test_progress_of_another_run_is_refused(tiny, tmp_path):
    model, variables, clean = tiny
    purify, saving = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2)
    purify(model, variables, clean, _config("ft"), jax.random.key(0), checkpointing=saving)
    for config, key in [
        (_config("ft", learning_rate="0.5"), jax.random.key(0)),
        (_config("ft"), jax.random.key(1)),
    ]:
        with pytest.raises(CheckpointError, match="holds a run with a different (config|key)"):
            purify(model, variables, clean, config, key, progress=False, checkpointing=saving)
    # the same variables fit a module that computes in bfloat16: its run is another run
    low = create_model("small_cnn", 10, width=4, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="holds a run with a different model"):
        purify(low, variables, clean, _config("ft"), jax.random.key(0), checkpointing=saving)


def _killed_before_step_four_saved(backdoored, out, monkeypatch, options):
    """Runs FT into ``out`` (saved every 2 steps, observed every 2) with the runner's
    evaluation raising _Killed at its third call (the undefended model, step 2, then step 4:
    killed before step 4's save), then puts the real evaluation back."""
    from fippure.purify import runner

    evaluate = runner.evaluate
    calls = []

    def dying_evaluate(backdoored, variables, images=None):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return evaluate(backdoored, variables, images)

    monkeypatch.setattr(runner, "evaluate", dying_evaluate)
    with pytest.raises(_Killed):
        run_defense(
            backdoored, "ft", out=out, checkpoint_every=2, **{**options, "observe_every": 2}
        )
    monkeypatch.setattr(runner, "evaluate", evaluate)


def test_the_runner_resumes_with_a_whole_trajectory_and_then_tidies_up(
    digits_badnets, tmp_path, monkeypatch
):

    options = dict(overrides={"steps": "6", "batch_size": "32"}, observe_every=2, progress=False)
    want = run_defense(digits_badnets, "ft", **options)

    _killed_before_step_four_saved(digits_badnets, tmp_path, monkeypatch, options)
    assert (tmp_path / PROGRESS).is_dir()
    got = run_defense(digits_badnets, "ft", out=tmp_path, checkpoint_every=2, **options)

    assert got["report"]["resumed_from_step"] == 2  # step 4 died before its save
    assert [p["step"] for p in got["trajectory"]] == [2, 4, 6]
    for mine, theirs in zip(got["trajectory"], want["trajectory"], strict=True):
        assert mine == pytest.approx(theirs, abs=1e-6)
    assert got["after"] == pytest.approx(want["after"], abs=1e-6)
    assert not (tmp_path / PROGRESS).exists() and (tmp_path / "report.json").exists()


@pytest.mark.parametrize("resumed_every, steps", [(0, None), (3, [3, 6])])
def test_a_run_resumed_with_another_observe_interval_keeps_no_points_of_the_old_one(
    digits_badnets, tmp_path, monkeypatch, resumed_every, steps
):
    # the killed run's points were returned beside the new interval's ([2, 4, 6] at 3), or
    # alone without a final point where the resumed run observed nothing

    options = dict(overrides={"steps": "6", "batch_size": "32"}, progress=False)
    _killed_before_step_four_saved(digits_badnets, tmp_path, monkeypatch, options)
    got = run_defense(
        digits_badnets,
        "ft",
        out=tmp_path,
        checkpoint_every=2,
        observe_every=resumed_every,
        **options,
    )
    assert got["report"]["resumed_from_step"] == 2
    if steps is None:
        assert "trajectory" not in got
    else:
        # resumed at step 2, it observes step 3 and the final step 6 at the new interval
        assert [p["step"] for p in got["trajectory"]] == steps


def test_a_finished_run_called_again_resumes_from_its_last_step(tiny, tmp_path):
    """Progress is saved after the last step too (3 is not a multiple of every=2), and a
    directory that holds every step returns the same result without taking a step."""
    model, variables, clean = tiny
    purify, saving, key = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2), jax.random.key(5)
    config = _config("ft", steps="3")
    first, first_report = purify(
        model, variables, clean, config, key, progress=False, checkpointing=saving
    )
    again, report = purify(
        model, variables, clean, config, key, progress=False, checkpointing=saving
    )
    assert first_report.resumed_from_step == 0
    assert report.resumed_from_step == 3 and report.steps == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, first)
    assert report.loss_curve == first_report.loss_curve


def test_progress_from_other_starting_weights_or_another_clean_set_is_refused(tiny, tmp_path):
    model, variables, clean = tiny
    purify, saving = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2)
    config = _config("ft", steps="3")
    purify(model, variables, clean, config, 0, progress=False, checkpointing=saving)
    other_weights = init_variables(model, jax.random.key(2), clean.spec.image_shape)
    with pytest.raises(CheckpointError, match="holds a run with a different variables"):
        purify(model, other_weights, clean, config, 0, progress=False, checkpointing=saving)
    other_clean = random_digits_clean_set(per_class=4, seed=1)
    with pytest.raises(CheckpointError, match="holds a run with a different clean_set"):
        purify(model, variables, other_clean, config, 0, progress=False, checkpointing=saving)


def test_a_checkpointing_interval_below_one_is_refused():
    with pytest.raises(InvalidInputError, match="every"):
        Checkpointing("somewhere", every=0)


def test_a_finished_run_killed_while_deleting_its_progress_runs_again(digits_badnets, tmp_path):
    """Killed while ``progress/`` was being deleted (after the checkpoint and report.json were
    written), a run left a half-deleted orbax step that every rerun failed to restore; the
    leftovers of a finished run are now dropped and the same command runs again."""
    options = dict(overrides={"steps": "4", "batch_size": "32"}, progress=False)
    first = run_defense(digits_badnets, "ft", out=tmp_path, checkpoint_every=2, **options)
    half_deleted = tmp_path / PROGRESS / "4"
    (half_deleted / "carry").mkdir(parents=True)
    (half_deleted / "commit_success.txt").write_text("")
    again = run_defense(digits_badnets, "ft", out=tmp_path, checkpoint_every=2, **options)
    assert again["after"] == first["after"] and again["report"]["resumed_from_step"] == 0
    assert not (tmp_path / PROGRESS).exists()


def test_a_damaged_trajectory_is_refused_in_one_line(digits_badnets, tmp_path, monkeypatch):
    from fippure.purify import runner

    options = dict(overrides={"steps": "6", "batch_size": "32"}, observe_every=2, progress=False)
    _killed_before_step_four_saved(digits_badnets, tmp_path, monkeypatch, options)
    trajectory = tmp_path / PROGRESS / runner.TRAJECTORY
    trajectory.write_text(trajectory.read_text()[:20])  # torn by a kill mid-write
    with pytest.raises(CheckpointError, match="damaged.*delete"):
        run_defense(digits_badnets, "ft", out=tmp_path, checkpoint_every=2, **options)


def test_a_run_its_observer_stopped_on_a_save_step_stops_there_again(tiny, tmp_path):
    """The stop's step was saved (a save due there is still made); called again with the same
    checkpointing, the run once resumed there without asking the observer and went on past
    the stop. The saved step is observed again, so the second call returns the first's result."""
    from fippure.purify.common import StopEarly

    model, variables, clean = tiny
    purify, saving, key = DEFENSES["ft"].purify, Checkpointing(tmp_path, every=2), jax.random.key(5)
    config = _config("ft")  # 6 steps

    def stop_at_four(done, variables):
        del variables
        if done >= 4:
            raise StopEarly

    runs = [
        purify(
            model, variables, clean, config, key, progress=False, checkpointing=saving,
            observer=stop_at_four, observe_every=2,
        )
        for _ in range(2)
    ]  # fmt: skip
    (first, first_report), (again, report) = runs
    assert first_report.steps == 4 and report.steps == 4 and report.resumed_from_step == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, first)


def test_a_rerun_into_a_finished_directory_killed_midway_resumes(
    digits_badnets, tmp_path, monkeypatch
):
    """Only a finished run's leftovers (its last step) are dropped: a rerun of the same run
    into its directory (to chart a trajectory, say), killed before its last step, resumes from
    its own progress although report.json is there."""

    options = dict(overrides={"steps": "6", "batch_size": "32"}, progress=False)
    run_defense(digits_badnets, "ft", out=tmp_path, checkpoint_every=2, **options)
    _killed_before_step_four_saved(digits_badnets, tmp_path, monkeypatch, options)
    got = run_defense(
        digits_badnets, "ft", out=tmp_path, checkpoint_every=2, observe_every=2, **options
    )
    assert got["report"]["resumed_from_step"] == 2
