"""``fippure train`` / ``fippure attack`` output directories: a run is stamped with everything
that shapes its weights, so a re-run resumes only the same run, and a finished run re-run
reports what it reported the first time."""

from __future__ import annotations

import json

import pytest

from fippure import cli
from fippure.checkpoints import claim_run_directory
from fippure.errors import CheckpointError, InvalidInputError
from fippure.recipes import train_backdoored, train_classifier
from fippure.training import TrainConfig

CONFIG = TrainConfig(epochs=1, batch_size=64, learning_rate=0.05, eval_every=1)
TINY = dict(dataset="digits", model="small_cnn", model_kwargs={"width": 4}, progress=False)


@pytest.fixture(scope="module")
def badnets_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("badnets")
    report = train_backdoored(out=out, config=CONFIG, attack="badnets", **TINY)
    return out, report


@pytest.mark.parametrize(
    ("changes", "differs"),
    [
        ({"attack": "blend"}, "attack"),
        ({"target": 3}, "target"),
        ({"clean_seed": 5}, "clean_seed"),
        ({"attack_options": {"size": 2}}, "attack_options"),
    ],
)
def test_another_attack_into_the_same_output_is_refused(badnets_run, changes, differs):
    out, _ = badnets_run
    options = {"attack": "badnets", **changes}
    with pytest.raises(CheckpointError, match=f"holds a run with a different .*{differs}"):
        train_backdoored(out=out, config=CONFIG, **options, **TINY)


def test_a_clean_training_cannot_relabel_a_backdoored_output(badnets_run):
    out, _ = badnets_run
    with pytest.raises(CheckpointError, match="holds a run with a different"):
        train_classifier(out=out, config=CONFIG, **TINY)
    assert json.loads((out / "metadata.json").read_text())["attack"]["name"] == "badnets"


def test_rerunning_a_finished_run_reports_the_same_result(badnets_run, tmp_path):
    out, first = badnets_run
    again = train_backdoored(out=out, config=CONFIG, attack="badnets", **TINY)
    assert again["resumed_from_step"] > 0  # it found the finished run and trained nothing
    assert (again["test_accuracy"], again["asr"]) == (first["test_accuracy"], first["asr"])
    clean = train_classifier(out=tmp_path, config=CONFIG, **TINY)
    rerun = train_classifier(out=tmp_path, config=CONFIG, **TINY)
    assert rerun["test_accuracy"] == clean["test_accuracy"] is not None
    # nothing was timed in a one-epoch run (its first interval is compilation)
    assert rerun["train_images_per_s"] is None


def test_a_stamp_with_nothing_beside_it_is_free(tmp_path):
    assert claim_run_directory(tmp_path, {"run": 1}) is False
    # a run that stopped before saving anything (a bad option) does not lock the directory
    assert claim_run_directory(tmp_path, {"run": 2}) is False
    (tmp_path / "saved").mkdir()
    with pytest.raises(CheckpointError, match="different run"):
        claim_run_directory(tmp_path, {"run": 3})
    assert claim_run_directory(tmp_path, {"run": 2}) is True


def test_attack_says_when_a_clean_label_attack_poisons_less_than_asked(tmp_path, capsys):
    argv = ["attack", "--dataset", "digits", "--model", "small_cnn", "--width", "4"]
    argv += ["--epochs", "1", "--attack", "sig", "--ratio", "0.5", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "fippure: note: sig poisons target-class images only" in captured.err
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert 0 < printed["realised_ratio"] < 0.2  # about a tenth of digits is one class


@pytest.mark.parametrize(
    ("attack", "options", "epochs", "message"),
    [
        ("lira", {}, 1, "lira needs more epochs"),
        ("ftrojan", {"window": 5, "frequencies": [[1, 1]]}, 1, "does not tile"),
    ],
)
def test_settings_an_attack_cannot_train_with_fail_before_the_output_is_claimed(
    tmp_path, attack, options, epochs, message
):
    import dataclasses

    from fippure.errors import InvalidInputError

    out = tmp_path / "run"
    config = dataclasses.replace(CONFIG, epochs=epochs)
    with pytest.raises(InvalidInputError, match=message):
        train_backdoored(out=out, config=config, attack=attack, attack_options=options, **TINY)
    assert not out.exists()  # so the corrected command may use the same --out


def test_a_reference_model_of_another_dataset_is_refused(tmp_path):
    import jax

    from fippure.checkpoints import model_metadata, save_checkpoint
    from fippure.errors import InvalidInputError
    from fippure.models import create_model, init_variables

    reference = tmp_path / "cifar_reference"
    model = create_model("small_cnn", 10, width=4)
    save_checkpoint(
        reference,
        init_variables(model, jax.random.key(0), (32, 32, 3)),
        {
            "model": model_metadata("small_cnn", 10, width=4),
            "dataset": "cifar10",
            "image_shape": [32, 32, 3],
        },
    )
    with pytest.raises(InvalidInputError, match="is a model of cifar10 .* not of digits"):
        train_backdoored(
            out=tmp_path / "lf", config=CONFIG, attack="lf", reference=reference, **TINY
        )


def test_the_clean_set_is_held_out_unless_asked_to_overlap():
    # SPEC section 1: disjoint is a choice, and a configurable one
    import numpy as np

    from fippure.recipes import prepare_data

    held_out = prepare_data("digits", clean_size=0.1)
    assert not set(held_out.clean_indices) & set(held_out.train_indices)
    assert len(held_out.train) + len(held_out.clean) == len(held_out.train_indices) + len(
        held_out.clean_indices
    )
    overlap = prepare_data("digits", clean_size=0.1, clean_disjoint=False)
    np.testing.assert_array_equal(overlap.clean_indices, held_out.clean_indices)
    assert set(overlap.clean_indices) <= set(overlap.train_indices)
    assert len(overlap.train) == len(held_out.train) + len(held_out.clean)
    with pytest.raises(InvalidInputError, match="clean_disjoint must be True or False"):
        prepare_data("digits", clean_disjoint="no")


def test_an_attack_trained_on_the_clean_sets_images_too_says_so(tmp_path, capsys):
    argv = ["attack", "--dataset", "digits", "--model", "small_cnn", "--width", "4"]
    argv += ["--epochs", "1", "--attack", "badnets", "--clean-overlap", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"]) == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["clean_disjoint"] is False
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train_examples"] == 1437  # the whole digits training split
    # the same output without the flag is another run
    with pytest.raises(CheckpointError, match="different"):
        train_backdoored(out=tmp_path, config=CONFIG, attack="badnets", **TINY)
