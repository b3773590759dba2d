"""A defense's stop chosen on D_v with a synthesized trigger (SPEC section 1: early stops are
chosen on the clean set, never on test data)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest

from fippure.commands.demo import DIGITS_FIP as DEMO_DIGITS_FIP
from fippure.data.splits import hold_out_per_class
from fippure.errors import InvalidInputError, UnknownNameError
from fippure.evaluation.metrics import evaluate_backdoor
from fippure.inference import accuracy
from fippure.purify.clean_stop import (
    CleanStopConfig,
    choose_stop,
    last_eligible,
    make_clean_stop_config,
    purify_with_clean_stop,
)
from fippure.purify.common import LAST_ITERATE_EXTRAS
from fippure.purify.ft import FTConfig
from fippure.purify.ft import purify as fine_tune
from fippure.purify.registry import get_defense, make_config
from fippure.purify.trigger_inversion import synthesized_asr

#: FIP on the digits CNN with the demo's setting (the search sets the budget). Over defense
#: seeds 0-3 the stop reached the threshold at 30-90 steps, with test ASR 0.000-0.015 and ACC
#: drops of 1.9-12.8 points (the 40 validation images cannot see a few points). The weaker
#: setting of test_purification.py (eta_F 0.05, recomputed statistics) never reached it on
#: one machine: its validation ACC fell to 0.13-0.25 at some checks.
DIGITS_FIP = {k: v for k, v in DEMO_DIGITS_FIP.items() if k != "steps"}
#: The tests of the search's mechanics take threshold 1 (every check reaches it), which no
#: trigger exceeds on the undefended model.
ANY_TRIGGER = {"require_firing_trigger": False}


def check(step, asr, acc=0.9):
    return {"step": step, "validation_synth_asr": asr, "validation_acc": acc}


def test_first_below_takes_the_first_check_under_the_threshold():
    checks = [check(10, 0.4), check(20, 0.04), check(30, 0.01)]
    assert choose_stop(checks, 0.05, "first_below") == (20, True)
    assert choose_stop(checks, 0.05, "lowest") == (30, True)


def test_without_a_check_under_the_threshold_the_lowest_asr_is_taken():
    checks = [check(10, 0.4), check(20, 0.2), check(30, 0.2), check(40, 0.3)]
    assert choose_stop(checks, 0.05, "first_below") == (20, False)
    assert choose_stop(checks, 0.05, "lowest") == (20, False)  # the earliest of a tie


def test_a_collapsed_model_is_not_purified():
    """A model that predicts one class has a synthesized ASR of 0; it is not eligible."""
    checks = [check(10, 0.0, acc=0.1), check(20, 0.03, acc=0.86), check(30, 0.0, acc=0.85)]
    assert choose_stop(checks, 0.05, "first_below", min_accuracy=0.83) == (20, True)
    assert choose_stop(checks, 0.05, "lowest", min_accuracy=0.83) == (30, True)
    # none eligible: the most accurate check
    assert choose_stop(checks, 0.05, "first_below", min_accuracy=0.9) == (20, False)


def test_a_check_exactly_at_the_accuracy_guard_is_eligible():
    checks = [check(10, 0.01, acc=0.8), check(20, 0.0, acc=0.5)]
    assert choose_stop(checks, 0.05, "first_below", min_accuracy=0.8) == (10, True)
    assert last_eligible(checks, min_accuracy=0.8) == 10


def test_a_nan_asr_never_counts():
    checks = [check(10, float("nan")), check(20, 0.3)]
    assert choose_stop(checks, 0.05, "first_below") == (20, False)


def test_the_validation_slice_is_the_last_images_of_every_class():
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 2, 2])
    fit, validation = hold_out_per_class(labels, 1)
    np.testing.assert_array_equal(validation, [4, 5, 8])
    np.testing.assert_array_equal(fit, [0, 1, 2, 3, 6, 7])
    assert set(labels[fit]) == set(labels[validation]) == {0, 1, 2}
    with pytest.raises(InvalidInputError, match="class 0 has 3 clean images"):
        hold_out_per_class(labels, 3)
    with pytest.raises(InvalidInputError, match="positive integer"):
        hold_out_per_class(labels, 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rule": "best"}, r"rule must be one of \['first_below', 'lowest'\], got 'best'"),
        ({"every": 20, "max_steps": 10}, "must not exceed max_steps"),
        ({"threshold": 1.5}, "threshold"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"inversion": {"steps": 5}}, "InversionConfig"),
    ],
)
def test_bad_settings_get_one_line_errors(fields, message):
    with pytest.raises(InvalidInputError, match=message):
        CleanStopConfig(**fields)


def test_command_line_settings_reach_the_scan_too():
    stop = make_clean_stop_config({"max_steps": "200", "rerun": "true", "inversion.steps": "40"})
    assert (stop.max_steps, stop.rerun, stop.inversion.steps) == (200, True, 40)
    assert not CleanStopConfig().rerun  # by default the validated iterate is returned
    assert stop.inversion.batch_size == CleanStopConfig().inversion.batch_size
    with pytest.raises(UnknownNameError, match="Did you mean 'steps'"):
        make_clean_stop_config({"inversion.step": "40"})
    with pytest.raises(InvalidInputError, match="inversion.steps=300"):
        make_clean_stop_config({"inversion": "40"})


@pytest.fixture(scope="module")
def digits_trigger(digits_scan):
    """The suspect of the Neural Cleanse scan of the digits clean set's training part."""
    return digits_scan.suspect


def test_the_stop_chosen_on_the_clean_set_purifies_the_digits_backdoor(
    digits_badnets, digits_trigger, full_optimization
):
    """With the suspect of a scan of D_v (BadNets' target), the stop reaches the threshold
    with the accuracy guard, and the model returned removes the backdoor on the test split,
    which the procedure never saw."""
    b = digits_badnets
    assert digits_trigger.target == b.target
    stop = CleanStopConfig(max_steps=300, every=30, validation_per_class=4)
    with full_optimization():
        variables, report = purify_with_clean_stop(
            "fip", b.model, b.variables, b.clean, make_config("fip", DIGITS_FIP), 0, stop,
            trigger=digits_trigger, progress=False,
        )  # fmt: skip
    summary = report.extra["clean_stop"]
    assert summary["reached_threshold"], summary["checks"]
    # the search ended at the first check under the threshold
    assert [c["step"] for c in summary["checks"]] == list(range(30, summary["chosen_step"] + 1, 30))
    assert summary["steps_run"] == summary["chosen_step"] < 300
    assert (summary["fit_examples"], summary["validation_examples"]) == (len(b.clean) - 40, 40)
    assert report.steps == summary["chosen_step"]
    chosen = next(c for c in summary["checks"] if c["step"] == summary["chosen_step"])
    assert chosen["validation_acc"] >= summary["undefended_validation_acc"] - 0.05
    before = evaluate_backdoor(b.model, b.variables, b.test, b.triggered)
    after = evaluate_backdoor(b.model, variables, b.test, b.triggered)
    assert before.asr > 0.95 and after.asr < 0.2, after
    assert after.acc > before.acc - 0.15, after


def test_a_rerun_is_the_defense_run_for_the_chosen_steps(digits_badnets, digits_trigger):
    """With ``rerun`` the result is exactly the defense's own run of that length on the
    training part, from the same key."""
    b = digits_badnets
    config = FTConfig(steps=1, batch_size=16, learning_rate=0.02)
    stop = CleanStopConfig(
        max_steps=6, every=2, validation_per_class=4, threshold=1.0, rerun=True, **ANY_TRIGGER
    )
    variables, report = purify_with_clean_stop(
        "ft", b.model, b.variables, b.clean, config, 5, stop, trigger=digits_trigger,
        progress=False,
    )  # fmt: skip
    summary = report.extra["clean_stop"]
    assert summary["chosen_step"] == 2 and summary["suspect_target"] == digits_trigger.target
    assert summary["scan"] is None  # the trigger was given
    fit, _ = hold_out_per_class(b.clean.labels, 4)
    direct, _ = fine_tune(
        b.model, b.variables, b.clean.subset(fit), FTConfig(steps=2, batch_size=16,
        learning_rate=0.02), jax.random.key(5), progress=False,
    )  # fmt: skip
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, direct)


def search_with_ft(backdoored, trigger, config, stop):
    """FT under the clean-set stop (key 1): ``(variables, report, {step: scored variables})``."""
    scored = {}
    variables, report = purify_with_clean_stop(
        "ft", backdoored.model, backdoored.variables, backdoored.clean, config, 1, stop,
        trigger=trigger, progress=False, observer=lambda step, v: scored.__setitem__(step, v),
    )  # fmt: skip
    return variables, report, scored


def test_without_rerun_the_scored_iterate_is_returned(digits_badnets, digits_trigger):
    b = digits_badnets
    config = FTConfig(steps=1, batch_size=16, learning_rate=0.05)
    stop = CleanStopConfig(max_steps=8, every=2, validation_per_class=4, rule="lowest")
    variables, report, scored = search_with_ft(b, digits_trigger, config, stop)
    summary = report.extra["clean_stop"]
    assert sorted(scored) == [2, 4, 6, 8]
    chosen = summary["chosen_step"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, scored[chosen])
    _, validation = hold_out_per_class(b.clean.labels, 4)
    held = b.clean.subset(validation)
    at = next(c for c in summary["checks"] if c["step"] == chosen)
    assert at["validation_acc"] == accuracy(b.model, variables, held.images, held.labels, b.spec)
    assert at["validation_synth_asr"] == synthesized_asr(
        b.model, variables, held.images, held.labels, digits_trigger, b.spec
    )
    assert report.steps == chosen


def test_the_search_halts_at_the_first_check_under_the_threshold(digits_badnets, digits_trigger):
    """Under ``first_below`` no later check can change the choice, so the defense stops there.
    The model returned is the scored iterate, finalised as a run of that length (statistics
    recomputed; the cosine schedule kept the search's length), and the same as without the halt."""
    b = digits_badnets
    config = FTConfig(steps=1, batch_size=16, learning_rate=0.05, final_batch_stats="recompute")
    stop = CleanStopConfig(
        max_steps=8, every=2, validation_per_class=4, threshold=1.0, **ANY_TRIGGER
    )
    variables, report, scored = search_with_ft(b, digits_trigger, config, stop)
    summary = report.extra["clean_stop"]
    assert sorted(scored) == [2] and [c["step"] for c in summary["checks"]] == [2]
    assert (summary["chosen_step"], summary["steps_run"], summary["searched_steps"]) == (2, 2, 8)
    assert report.steps == 2 and report.loss_curve[-1]["step"] == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, scored[2])
    full, full_report, _ = search_with_ft(
        b, digits_trigger, config, dataclasses.replace(stop, halt_when_reached=False)
    )
    assert [c["step"] for c in full_report.extra["clean_stop"]["checks"]] == [2, 4, 6, 8]
    assert full_report.steps == 2 and full_report.loss_curve[-1]["step"] <= 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, full)


def test_a_trigger_that_does_not_fire_before_the_defense_cannot_stop_it(
    digits_badnets, digits_trigger
):
    # a trigger whose ASR was already under the threshold made the first check "reach" it,
    # and the search stopped there as if the model were purified
    b = digits_badnets
    silent = dataclasses.replace(digits_trigger, mask=np.zeros_like(digits_trigger.mask))
    config = FTConfig(steps=1, batch_size=16, learning_rate=0.05)
    stop = CleanStopConfig(max_steps=6, every=2, validation_per_class=4)
    with pytest.warns(UserWarning, match="cannot judge purification"):
        _, report, scored = search_with_ft(b, silent, config, stop)
    summary = report.extra["clean_stop"]
    assert summary["undefended_validation_synth_asr"] <= stop.threshold
    assert not summary["trigger_informative"] and not summary["reached_threshold"]
    assert sorted(scored) == [2, 4, 6] and summary["steps_run"] == 6
    eligible = [
        c["step"]
        for c in summary["checks"]
        if c["validation_acc"] >= summary["undefended_validation_acc"] - stop.max_accuracy_drop
    ]
    assert summary["chosen_step"] == (eligible[-1] if eligible else summary["chosen_step"])
    # the real trigger fires on the undefended model: it is informative
    _, fired, _ = search_with_ft(b, digits_trigger, config, stop)
    assert fired.extra["clean_stop"]["undefended_validation_synth_asr"] > stop.threshold
    assert fired.extra["clean_stop"]["trigger_informative"]


def test_a_trigger_for_other_images_is_refused_before_the_search(digits_badnets, digits_trigger):
    b = digits_badnets
    wide = dataclasses.replace(digits_trigger, mask=np.zeros((32, 32, 1), np.float32))
    with pytest.raises(InvalidInputError, match=r"mask has shape \(32, 32, 1\)"):
        search_with_ft(b, wide, FTConfig(steps=1), CleanStopConfig(max_steps=2, every=1))


def test_bad_calls_get_one_line_errors(digits_badnets, digits_trigger):
    b = digits_badnets
    run = lambda name, config, **kw: purify_with_clean_stop(  # noqa: E731
        name, b.model, b.variables, b.clean, config, 0,
        CleanStopConfig(max_steps=2, every=1, **kw), trigger=digits_trigger, progress=False,
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match="ft takes a FTConfig"):
        run("ft", make_config("fip"))
    with pytest.raises(InvalidInputError, match="set average_last=0"):
        run("fip", make_config("fip", {"average_last": "4"}))
    with pytest.raises(InvalidInputError, match="holding out 50 per class"):
        run("ft", FTConfig(), validation_per_class=50)
    with pytest.raises(UnknownNameError, match="unknown defense 'fipp'"):
        run("fipp", FTConfig())


def test_purify_command_stops_on_the_clean_set(
    digits_badnets_path, tmp_path, capsys, optimized_compilation
):
    """``fippure purify --stop-on-clean-set`` records the search in the report and the
    purified checkpoint's metadata; ``--stop-set`` options are validated in one line."""
    from fippure import cli
    from fippure.checkpoints import read_metadata

    out = tmp_path / "stopped"
    argv = ["purify", "--checkpoint", str(digits_badnets_path), "--defense", "ft"]
    stop_options = ["max_steps=4", "every=2", "validation_per_class=4", "inversion.steps=5"]
    stop_flags = [flag for option in stop_options for flag in ("--stop-set", option)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main([*argv, "--stop-on-clean-set", *stop_flags, "--out", str(out)]) == 0
    assert "stop chosen on D_v: step" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    summary = report["report"]["extra"]["clean_stop"]
    # a brief scan may suspect a class its trigger does not send images to: then it says so
    warned = any("cannot judge purification" in str(w.message) for w in caught)
    assert warned == (not summary["trigger_informative"])
    assert summary["steps_run"] in (2, 4) and summary["searched_steps"] == 4
    assert [c["step"] for c in summary["checks"]] == list(range(2, summary["steps_run"] + 1, 2))
    # no trigger given: a (brief) scan of the training part chose the suspect
    scan = summary["scan"]
    assert (
        len(scan["mask_l1"]) == 10 and summary["fit_examples"] == len(report["clean_indices"]) - 40
    )
    suspect = summary["suspect_target"]
    assert suspect in scan["flagged"] or suspect == int(np.argmin(scan["mask_l1"]))
    assert report["report"]["steps"] == summary["chosen_step"]
    assert read_metadata(out)["defense"]["clean_stop"]["inversion"]["steps"] == 5
    for bad, message in (
        (["--stop-set", "max_steps=4"], "--stop-set applies with --stop-on-clean-set"),
        (["--stop-on-clean-set", "--stop-set", "inversion.step=4"], "option 'step'"),
        (["--stop-on-clean-set", "--stop-set", "rule=best"], "rule must be one of"),
    ):
        assert cli.main([*argv, *bad, "--out", str(tmp_path / "bad")]) != 0
        assert message in capsys.readouterr().err


def test_an_earlier_iterate_is_reported_without_the_last_steps_mask_statistics(
    digits_badnets, digits_trigger
):
    # NFT's report described the masks of its last step, not those of the iterate returned
    b = digits_badnets
    config = make_config("nft", {"mask_pattern": "^bn[23]$", "learning_rate": 0.5})
    stop = CleanStopConfig(
        max_steps=6,
        every=2,
        validation_per_class=4,
        threshold=1.0,
        halt_when_reached=False,
        **ANY_TRIGGER,
    )
    _, report = purify_with_clean_stop(
        "nft", b.model, b.variables, b.clean, config, 0, stop, trigger=digits_trigger,
        progress=False,
    )  # fmt: skip
    assert report.extra["clean_stop"]["chosen_step"] == report.steps == 2
    assert not LAST_ITERATE_EXTRAS & set(report.extra) and report.artifacts == {}
    assert "clean_per_class" in report.extra  # a fact about the clean set stays
    # the defense's own report has them
    _, own = get_defense("nft").purify(
        b.model, b.variables, b.clean, dataclasses.replace(config, steps=2), 0, progress=False
    )
    assert LAST_ITERATE_EXTRAS <= set(own.extra)
