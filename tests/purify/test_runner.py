"""The runner judges a defense on test data only after it has returned, and saves the result."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fippure.checkpoints import load_checkpoint
from fippure.errors import CheckpointError, InvalidInputError, NonFiniteLossError
from fippure.evaluation import defense_effectiveness_rating
from fippure.models.registry import create_model, init_variables
from fippure.purify import DEFENSES, make_config
from fippure.purify.common import StopEarly
from fippure.purify.ft import FTConfig, purify
from fippure.purify.registry import get_defense
from fippure.purify.runner import evaluate, run_defense


def test_run_defense_reports_before_after_and_der(digits_badnets, tmp_path):
    result = run_defense(
        digits_badnets,
        "ft",
        overrides={"steps": "20", "batch_size": "32"},
        out=tmp_path,
        progress=False,
    )
    before, after = result["before"], result["after"]
    assert before["asr"] > 0.95
    assert result["der"] == pytest.approx(
        defense_effectiveness_rating(
            acc_before=before["acc"],
            asr_before=before["asr"],
            acc_after=after["acc"],
            asr_after=after["asr"],
        )
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["report"]["steps"] == 20 and saved["defense"] == "ft"
    purified = load_checkpoint(tmp_path)
    assert purified.metadata["defense"]["name"] == "ft"
    assert purified.metadata["attack"]["name"] == "badnets"
    np.testing.assert_array_equal(purified.metadata["clean_indices"], digits_badnets.clean_indices)
    # SPEC section 1: the clean set's indices are saved next to every result
    assert saved["clean_indices"] == [int(i) for i in digits_badnets.clean_indices]
    assert result["clean_indices"] == saved["clean_indices"]


@pytest.mark.parametrize(
    "given", [{"clean_size": 10}, {"data_dir": "/elsewhere"}, {"dtype": "bfloat16"}]
)
def test_loading_options_are_refused_for_an_already_loaded_model(digits_badnets, given):
    """A smaller clean set is drawn when loading; silently running on the whole one would
    make a clean-set ablation meaningless."""
    with pytest.raises(InvalidInputError, match="applies when a checkpoint is loaded"):
        run_defense(digits_badnets, "ft", overrides={"steps": "2"}, progress=False, **given)


#: A short FIP run that stays finite on the digits CNN (its defaults diverge there).
SHORT_FIP = {"steps": "20", "batch_size": "32", "learning_rate": "0.01", "eta_F": "0.05"}


def test_a_defense_can_run_in_bfloat16_on_float32_weights(
    digits_badnets, digits_badnets_path, tmp_path
):
    """``dtype`` switches the loaded model's computation; the weights stay float32 and the
    evaluation runs in the same dtype as the defense."""
    result = run_defense(
        digits_badnets_path,
        "fip",
        overrides=SHORT_FIP,
        dtype="bfloat16",
        out=tmp_path,
        progress=False,
    )
    assert result["model_dtype"] == "bfloat16"
    assert result["report"]["steps"] == 20
    full = evaluate(digits_badnets, digits_badnets.variables)
    assert result["before"]["acc"] == pytest.approx(full["acc"], abs=0.02)
    assert result["before"]["asr"] == pytest.approx(full["asr"], abs=0.02)
    purified = load_checkpoint(tmp_path)
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(purified.variables)} == {"float32"}
    assert purified.metadata["defense"]["model_dtype"] == "bfloat16"
    # the source's model entry is kept: the purified weights load in any dtype
    assert purified.model.dtype is None
    # the dtype is part of the run: a float32 run does not resume the bfloat16 one
    with pytest.raises(CheckpointError, match="holds a run with a different dtype"):
        run_defense(
            digits_badnets_path,
            "fip",
            overrides=SHORT_FIP,
            out=tmp_path,
            progress=False,
        )


def test_an_output_directory_holding_another_checkpoint_or_run_is_refused(
    digits_badnets, digits_badnets_path, tmp_path
):
    # Writing into the source checkpoint would replace the backdoored model with its output.
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run_defense(digits_badnets, "ft", overrides={"steps": "2"}, out=digits_badnets_path)
    assert load_checkpoint(digits_badnets_path).metadata.get("defense") is None
    fast = {"steps": "2", "batch_size": "16"}
    run_defense(digits_badnets, "ft", overrides=fast, out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="holds a run with a different config, defense"):
        run_defense(digits_badnets, "fip", overrides=fast, out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different seed"):
        run_defense(digits_badnets, "ft", overrides=fast, seed=1, out=tmp_path, progress=False)
    # the same run may be repeated into its own output
    again = run_defense(digits_badnets, "ft", overrides=fast, out=tmp_path, progress=False)
    assert again["after"] == json.loads((tmp_path / "report.json").read_text())["after"]
    assert load_checkpoint(tmp_path).metadata["defense"]["name"] == "ft"
    # a run that failed before saving anything (here: a mask pattern that matches nothing)
    # leaves its directory to the next run
    failed = tmp_path / "failed"
    with pytest.raises(InvalidInputError, match="no BatchNorm module matches"):
        run_defense(digits_badnets, "nft", overrides={"mask_pattern": "nothing"}, out=failed)
    fixed = {"mask_pattern": "bn[23]$", **fast}
    run_defense(digits_badnets, "nft", overrides=fixed, out=failed, progress=False)
    assert load_checkpoint(failed).metadata["defense"]["name"] == "nft"
    # replace=True (the demo's) swaps another run's output for this one, never a checkpoint
    run_defense(digits_badnets, "fip", overrides=fast, out=tmp_path, replace=True, progress=False)
    assert load_checkpoint(tmp_path).metadata["defense"]["name"] == "fip"
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run_defense(digits_badnets, "ft", overrides=fast, out=digits_badnets_path, replace=True)


@pytest.mark.parametrize(
    ("defense", "wrong"), [("ft", "fip"), ("fip", "ft"), ("nft", "ngf"), ("ngf", "nft")]
)
def test_another_defenses_config_is_refused_in_one_line(digits_badnets, defense, wrong):
    bd = digits_badnets
    with pytest.raises(InvalidInputError, match=f"{defense} takes a .*Config, got .*Config"):
        DEFENSES[defense].purify(bd.model, bd.variables, bd.clean, make_config(wrong))


def test_the_key_may_be_a_seed_or_a_legacy_key_and_nothing_else(digits_badnets):
    bd = digits_badnets
    config = FTConfig(steps=2, batch_size=16)

    def run(key):
        return purify(bd.model, bd.variables, bd.clean, config, key, progress=False)[0]

    expected = run(jax.random.key(3))
    for same in (3, np.int64(3), jax.random.PRNGKey(3)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, run(same), expected)
    for bad in ("3", 2.5, jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(InvalidInputError, match="key must be one jax.random.key"):
            run(bad)
    for out_of_range in (-1, 2**32, 2**63):  # 2**32 would alias seed 0
        with pytest.raises(InvalidInputError, match=r"seed must lie in \[0, 2\*\*32\)"):
            run(out_of_range)


def test_fip_refuses_a_fast_fip_config_whose_fields_it_would_ignore(digits_badnets):
    bd = digits_badnets
    with pytest.raises(InvalidInputError, match="fip takes a FIPConfig, got FastFIPConfig"):
        DEFENSES["fip"].purify(bd.model, bd.variables, bd.clean, make_config("fast_fip"))


def test_an_output_directory_that_is_a_file_is_refused_in_one_line(digits_badnets, tmp_path):
    from fippure.purify.resume import Checkpointing

    bd = digits_badnets
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        purify(
            bd.model,
            bd.variables,
            bd.clean,
            FTConfig(steps=2),
            progress=False,
            checkpointing=Checkpointing(taken),
        )


def test_a_clean_set_missing_a_class_is_refused(digits_badnets):
    clean = digits_badnets.clean
    without_seven = clean.subset(np.flatnonzero(clean.labels != 7))
    with pytest.raises(InvalidInputError, match=r"no example of class\(es\) \[7\]"):
        purify(digits_badnets.model, digits_badnets.variables, without_seven, FTConfig(steps=1))


@pytest.mark.parametrize("defense", ["fip", "nft", "ngf", "ft"])
def test_a_model_that_cannot_take_the_clean_images_is_refused(defense, digits_badnets):
    """Variables built for 32x32x3 inputs, or for 7 classes, against the 8x8 digits clean set:
    one line naming the mismatch, before any step (not Flax's shape error from inside jit)."""
    model = create_model("small_cnn", 10, width=4)
    cifar_variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    seven = create_model("small_cnn", 7, width=4)
    seven_variables = init_variables(seven, jax.random.key(0), (8, 8, 1))
    config = make_config(defense, {"steps": "1"})
    purify_fn = DEFENSES[defense].purify
    clean = digits_badnets.clean
    with pytest.raises(InvalidInputError, match=r"do not fit the clean set's digits images"):
        purify_fn(model, cifar_variables, clean, config, jax.random.key(1), progress=False)
    with pytest.raises(InvalidInputError, match="7 outputs but the clean set has 10 classes"):
        purify_fn(seven, seven_variables, clean, config, jax.random.key(1), progress=False)


def test_a_diverging_defense_stops_with_a_clear_error(digits_badnets):
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        purify(
            digits_badnets.model,
            digits_badnets.variables,
            digits_badnets.clean,
            FTConfig(steps=60, learning_rate=1e12, log_every=20),
            progress=False,
        )


def test_a_last_update_that_overflows_is_an_error_not_a_purified_model(digits_badnets):
    # step 2's loss is taken before step 2's update, so only a check of the weights sees it
    with pytest.raises(NonFiniteLossError, match="non-finite by step 2"):
        purify(
            digits_badnets.model,
            digits_badnets.variables,
            digits_badnets.clean,
            FTConfig(steps=2, learning_rate=1e38, momentum=0.0, weight_decay=0.0, log_every=1),
            progress=False,
        )


def test_non_finite_progress_is_never_saved(digits_badnets, tmp_path):
    from fippure.purify.resume import Checkpointing

    config = FTConfig(steps=8, learning_rate=1e38, momentum=0.0, weight_decay=0.0, log_every=8)
    with pytest.raises(NonFiniteLossError):
        purify(
            digits_badnets.model,
            digits_badnets.variables,
            digits_badnets.clean,
            config,
            progress=False,
            checkpointing=Checkpointing(tmp_path / "run", every=2),
        )
    saved = sorted(p.name for p in (tmp_path / "run").rglob("*") if p.is_dir())
    assert not any(name.isdigit() and int(name) > 0 for name in saved), saved


@pytest.mark.parametrize("defense", ["fip", "fast_fip", "nft", "ngf", "ft", "ft_sam"])
def test_observing_a_defense_charts_test_metrics_without_changing_it(digits_badnets, defense):
    overrides = {"steps": "6", "batch_size": "32", "log_every": "3"}
    if defense in ("fip", "fast_fip"):
        overrides["eta_F"] = "0.05"  # unclipped, eta_F 1 diverges on digits
    if defense == "nft":
        overrides["mask_pattern"] = "bn[23]$"  # the small CNN has no residual blocks
    watched = run_defense(
        digits_badnets, defense, overrides=overrides, progress=False, observe_every=4
    )
    plain = run_defense(digits_badnets, defense, overrides=overrides, progress=False)
    assert [point["step"] for point in watched["trajectory"]] == [4, 6]
    assert watched["trajectory"][-1]["acc"] == watched["after"]["acc"]
    assert watched["trajectory"][-1]["asr"] == watched["after"]["asr"]
    assert watched["after"] == plain["after"]
    assert "trajectory" not in plain


def test_a_charted_run_uploads_its_test_images_once_not_at_every_observation(
    digits_badnets, monkeypatch
):
    """CIFAR-10's test and triggered images are about 141 MB; copying them to the device
    at every observation would dominate a finely charted GPU run. The metrics are those of
    an evaluation from the host images."""
    from fippure import inference

    test_sets = (digits_badnets.test.images, digits_badnets.triggered.images)
    host_images = []
    check_images = inference.check_images

    def recording(images, spec, rows=None):
        if any(images is test_set for test_set in test_sets):
            host_images.append(len(images))
        return check_images(images, spec, rows)

    monkeypatch.setattr(inference, "check_images", recording)
    overrides = {"steps": "4", "batch_size": "32"}
    charted = run_defense(
        digits_badnets, "ft", overrides=overrides, progress=False, observe_every=1
    )
    assert [point["step"] for point in charted["trajectory"]] == [1, 2, 3, 4]
    assert host_images == []  # before, four observations and after: all from device copies
    monkeypatch.setattr(inference, "check_images", check_images)
    assert charted["after"] == evaluate(digits_badnets, get_defense("ft").purify(
        digits_badnets.model, digits_badnets.variables, digits_badnets.clean,
        make_config("ft", overrides), jax.random.key(0), progress=False,
    )[0])  # fmt: skip


def _stopped_at_step_two(backdoored, defense, overrides):
    """``defense`` on ``backdoored`` with an observer that raises StopEarly at step 2:
    ``(variables, report, {step: variables seen})``."""
    seen = {}

    def stop_at_two(step, variables):
        seen[step] = variables
        if step == 2:
            raise StopEarly

    b = backdoored
    variables, report = get_defense(defense).purify(
        b.model, b.variables, b.clean, make_config(defense, overrides), jax.random.key(0),
        progress=False, observer=stop_at_two, observe_every=2,
    )  # fmt: skip
    return variables, report, seen


@pytest.mark.parametrize("defense", ["fip", "fast_fip", "nft", "ngf", "ft"])
def test_an_observer_that_raises_stop_early_ends_the_defense_at_that_step(digits_badnets, defense):
    """The defense returns the iterate the observer saw (finalised as a run of that length)
    and reports the steps it took; the loss curve ends there too."""
    overrides = {"steps": "6", "batch_size": "32", "log_every": "3"}
    if defense in ("fip", "fast_fip"):
        overrides["eta_F"] = "0.05"
    if defense == "nft":
        overrides["mask_pattern"] = "bn[23]$"
    variables, report, seen = _stopped_at_step_two(digits_badnets, defense, overrides)
    assert sorted(seen) == [2]
    assert report.steps == 2 and report.loss_curve[-1]["step"] == 2
    assert report.config["steps"] == 6  # the schedule kept the configured length
    # NFT clips its masks into [mu(l), 1] after the last step: equal up to that rounding
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), variables, seen[2]
    )


@pytest.mark.parametrize("defense", ["fip", "fast_fip"])
def test_a_tail_average_longer_than_the_steps_done_does_not_fail_an_early_stop(
    digits_badnets, defense
):
    # finalising rebuilt the config with steps=2 and average_last=4, which its checks refused
    # after every step had run
    overrides = {"steps": "6", "batch_size": "32", "eta_F": "0.05", "average_last": "4"}
    variables, report, seen = _stopped_at_step_two(digits_badnets, defense, overrides)
    assert report.steps == 2 and report.config["average_last"] == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, seen[2])


@pytest.mark.parametrize(
    "option, value",
    [
        ("observe_every", -3),
        ("observe_every", 1.5),
        ("checkpoint_every", 0),
        ("checkpoint_every", 2.5),
    ],
)
def test_bad_intervals_are_refused_before_the_output_is_claimed(
    digits_badnets, tmp_path, monkeypatch, option, value
):
    # a negative observe_every was taken as "off", a fractional one observed where
    # done % 1.5 == 0, and a bad checkpoint_every failed only after the directory was claimed
    # and the undefended model evaluated on the whole test split
    from fippure.purify import runner

    monkeypatch.setattr(runner, "evaluate", lambda *a: pytest.fail("evaluated before the check"))
    out = tmp_path / "run"
    with pytest.raises(InvalidInputError, match=f"{option} must be an integer >= "):
        run_defense(digits_badnets, "ft", out=out, progress=False, **{option: value})
    assert not out.exists()


def test_der_is_computed_from_the_before_and_after_metrics(digits_badnets, monkeypatch):
    """SPEC section 1's DER from the undefended model's metrics and the purified one's (a
    short digits run barely moves either, so the metrics are stubbed apart)."""
    from fippure.purify import runner

    metrics = iter([{"acc": 0.9, "asr": 0.95, "ra": 0.0}, {"acc": 0.8, "asr": 0.1, "ra": 0.7}])
    monkeypatch.setattr(
        runner, "evaluate", lambda backdoored, variables, images=None: next(metrics)
    )
    result = run_defense(
        digits_badnets, "ft", overrides={"steps": "1", "batch_size": "8"}, progress=False
    )
    assert result["der"] == pytest.approx((0.85 - 0.1 + 1) / 2)
