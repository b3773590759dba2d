"""run_defense's output directory: the trajectory of a resumed or clean-stop run, and what may
take over or replace a directory."""

from __future__ import annotations

import pytest

from fippure.purify.runner import run_defense


class _Killed(Exception):
    pass


def test_a_resumed_run_charts_the_steps_after_its_last_save_once(
    digits_badnets, tmp_path, monkeypatch
):
    """Killed at step 4's evaluation, the run had charted step 3 after its save at step 2;
    the resumed run charts step 3 again, replacing (not duplicating) that point."""
    from fippure.purify import runner

    evaluate, calls = runner.evaluate, []

    def dying(backdoored, variables, images=None):
        calls.append(1)
        if len(calls) == 5:  # the undefended model, steps 1, 2 (saved), 3, then step 4
            raise _Killed
        return evaluate(backdoored, variables, images)

    options = dict(
        overrides={"steps": "6", "batch_size": "32"},
        observe_every=1,
        checkpoint_every=2,
        progress=False,
    )
    monkeypatch.setattr(runner, "evaluate", dying)
    with pytest.raises(_Killed):
        run_defense(digits_badnets, "ft", out=tmp_path, **options)
    monkeypatch.setattr(runner, "evaluate", evaluate)
    got = run_defense(digits_badnets, "ft", out=tmp_path, **options)
    assert got["report"]["resumed_from_step"] == 2
    assert [p["step"] for p in got["trajectory"]] == [1, 2, 3, 4, 5, 6]


def test_a_clean_stop_run_charts_its_checks_and_saves_no_progress(digits_badnets, tmp_path):
    """With clean_stop the run saves no progress (its searches are short), and the
    trajectory holds the test metrics at the search's checks."""
    from fippure.purify.clean_stop import make_clean_stop_config
    from fippure.purify.runner import PROGRESS

    stop = make_clean_stop_config(
        {
            "max_steps": "4",
            "every": "2",
            "validation_per_class": "4",
            "inversion.steps": "5",
            "threshold": "1.0",
            "halt_when_reached": "false",
            "require_firing_trigger": "false",
        }
    )
    result = run_defense(
        digits_badnets,
        "ft",
        overrides={"batch_size": "16"},
        out=tmp_path,
        observe_every=1,
        clean_stop=stop,
        progress=False,
    )
    assert [p["step"] for p in result["trajectory"]] == [2, 4]
    assert not (tmp_path / PROGRESS).exists() and (tmp_path / "report.json").exists()


def test_replace_never_removes_the_run_of_another_command(tmp_path):
    """An interrupted training run (its stamp and its progress, no checkpoint yet) is not a
    defense's output: replace=True must refuse it, not delete it."""
    from fippure.checkpoints import claim_run_directory
    from fippure.errors import CheckpointError
    from fippure.purify.runner import claim_output_directory

    out = tmp_path / "training"
    claim_run_directory(out, {"dataset": "digits", "epochs": 3})
    (out / "progress").mkdir()
    (out / "progress" / "0").mkdir()  # a saved step of the training run
    with pytest.raises(CheckpointError, match="holds a run with a different"):
        claim_output_directory(out, {"defense": "ft", "seed": 0}, replace=True)
    assert (out / "progress" / "0").is_dir()


def test_a_clean_stop_run_is_not_taken_for_the_plain_run_in_its_output(digits_badnets, tmp_path):
    from fippure.errors import CheckpointError
    from fippure.purify.clean_stop import make_clean_stop_config

    fast = {"steps": "2", "batch_size": "16"}
    run_defense(digits_badnets, "ft", overrides=fast, out=tmp_path, progress=False)
    stop = make_clean_stop_config(
        {"max_steps": "2", "every": "2", "validation_per_class": "4", "inversion.steps": "5"}
    )
    with pytest.raises(CheckpointError, match="holds a run with a different clean_stop"):
        run_defense(
            digits_badnets, "ft", overrides=fast, out=tmp_path, clean_stop=stop, progress=False
        )
