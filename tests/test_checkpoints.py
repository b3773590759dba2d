"""Checkpoint round trip, and clear errors for wrong, missing or corrupt checkpoints."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from fippure.checkpoints import (
    claim_run_directory,
    load_checkpoint,
    model_metadata,
    read_metadata,
    save_checkpoint,
)
from fippure.errors import CheckpointError
from fippure.models import create_model, init_variables


@pytest.fixture(scope="module")
def small():
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    # Non-trivial batch statistics, so that a mix-up of collections would show.
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda x: x + np.arange(x.size, dtype=x.dtype).reshape(x.shape) / 7,
        variables["batch_stats"],
    )
    return model, variables


@pytest.fixture
def saved(tmp_path, small):
    _, variables = small
    metadata = {
        "model": model_metadata("small_cnn", 10, width=4),
        "dataset": "digits",
        "normalization": {"mean": [0.3053], "std": [0.376]},
        "attack": {"name": "badnets", "target": 0},
        "clean_indices": np.array([3, 17, 256]),
    }
    extras = {"trigger": {"pattern": np.arange(12.0).reshape(3, 4), "alpha": np.float32(0.2)}}
    return save_checkpoint(tmp_path / "ckpt", variables, metadata, extras=extras)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_round_trip(saved, small):
    model, variables = small
    loaded = load_checkpoint(saved)
    _assert_trees_equal(loaded.variables, variables)
    assert loaded.model == model  # rebuilt from the metadata: same class and fields
    meta = loaded.metadata
    assert meta["model"] == {"name": "small_cnn", "num_classes": 10, "kwargs": {"width": 4}}
    assert meta["dataset"] == "digits" and meta["attack"] == {"name": "badnets", "target": 0}
    assert meta["clean_indices"] == [3, 17, 256]
    assert meta["extras"] == ["trigger"]
    assert {"fippure_version", "git_revision", "created", "format_version"} <= set(meta)
    _assert_trees_equal(
        loaded.extras["trigger"],
        {"pattern": np.arange(12.0).reshape(3, 4), "alpha": np.float32(0.2)},
    )
    assert loaded.path == saved and saved.is_absolute()
    assert read_metadata(saved) == meta


def test_relative_path_and_overwrite(tmp_path, small, monkeypatch):
    _, variables = small
    monkeypatch.chdir(tmp_path)
    meta = {"model": model_metadata("small_cnn", 10, width=4), "dataset": "digits"}
    path = save_checkpoint("relative", variables, meta)
    assert path == (tmp_path / "relative").resolve()
    (tmp_path / "relative" / "report.json").write_text("{}")
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, variables)
    save_checkpoint("relative", doubled, meta)  # overwrites the checkpoint, keeps other files
    _assert_trees_equal(load_checkpoint("relative").variables, doubled)
    assert (tmp_path / "relative" / "report.json").exists()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_checkpoint("relative", variables, meta, overwrite=False)
    with pytest.raises(CheckpointError, match="needs a 'model' entry"):
        save_checkpoint("other", variables, {"dataset": "digits"})


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (
            ("small_cnn", {"width": 8}),
            r"\(a small_cnn\) does not fit the SmallCNN it is loaded into: 16 shape\(s\) "
            r"differ, e\.g\. batch_stats/bn1/mean: \(4,\) stored vs \(8,\)",
        ),
        (
            ("vgg11_bn", {"width": 8}),
            r"does not fit the VGG it is loaded into: .*; 25 missing, e\.g\. ",
        ),
    ],
)
def test_wrong_model(saved, other, match):
    name, kwargs = other
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(saved, model=create_model(name, 10, **kwargs))
    assert "\n" not in str(error.value)


def test_wrong_number_of_classes(saved):
    with pytest.raises(CheckpointError, match=r"params/head/bias: \(10,\) stored vs \(43,\)"):
        load_checkpoint(saved, model=create_model("small_cnn", 43, width=4))


@pytest.mark.parametrize(
    ("model_entry", "extra", "match"),
    [
        (
            model_metadata("small_cnn", 10, width=8),
            {},
            r"cannot write checkpoint .*: the variables do not fit the model its metadata names, "
            r"small_cnn \(a SmallCNN on \(8, 8, 1\) images\): 16 shape\(s\) differ, e\.g\. "
            r"batch_stats/bn1/mean: \(4,\) given vs \(8,\)",
        ),
        (
            model_metadata("small_cnn", 43, width=4),
            {},
            r"params/head/bias: \(10,\) given vs \(43,\)",
        ),
        (
            model_metadata("small_cnn", 10, width=4),
            {"image_shape": [32, 32, 3]},
            r"a SmallCNN on \(32, 32, 3\) images",
        ),
        (
            model_metadata("small_cnn", 10, depth=4),
            {},
            r"its metadata's model entry does not build a model \(model small_cnn takes no "
            r"argument",
        ),
    ],
)
def test_variables_that_the_metadata_could_not_load_are_refused_before_writing(
    tmp_path, small, model_entry, extra, match
):
    """What :func:`load_checkpoint` would refuse is refused by ``save_checkpoint`` already, and
    nothing is written."""
    _, variables = small
    metadata = {"model": model_entry, "dataset": "digits", **extra}
    with pytest.raises(CheckpointError, match=match) as error:
        save_checkpoint(tmp_path / "ckpt", variables, metadata)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_model_outside_the_registry_is_saved_and_loaded_with_its_module(tmp_path, small):
    """Without a registered name there is nothing to rebuild: the module passed to
    ``save_checkpoint`` is checked, ``load_checkpoint(model=...)`` loads it, and loading it
    without the module says to pass it."""
    model, variables = small
    metadata = {"model": model_metadata("my_own_cnn", 10), "image_shape": [8, 8, 1]}
    with pytest.raises(CheckpointError, match="names, my_own_cnn \\(a SmallCNN"):
        save_checkpoint(
            tmp_path / "wrong", variables, metadata, model=create_model("small_cnn", 10, width=8)
        )
    path = save_checkpoint(tmp_path / "own", variables, metadata)  # unchecked: nothing to check
    path = save_checkpoint(tmp_path / "own", variables, metadata, model=model)
    _assert_trees_equal(load_checkpoint(path, model=model).variables, variables)
    with pytest.raises(
        CheckpointError, match=r"holds a 'my_own_cnn', which is not a regis.*model=\.\.\.\)"
    ):
        load_checkpoint(path)


def _corrupt_metadata(path):
    (path / "metadata.json").write_text('{"model": {"name": "small_')


def _metadata_without_model(path):
    meta = json.loads((path / "metadata.json").read_text())
    del meta["model"]
    (path / "metadata.json").write_text(json.dumps(meta))


def _no_metadata(path):
    (path / "metadata.json").unlink()


def _no_variables(path):
    shutil.rmtree(path / "variables")


def _empty_variables(path):
    shutil.rmtree(path / "variables")
    (path / "variables").mkdir()


def _garbled_variables(path):
    for item in (path / "variables").rglob("*"):
        if item.is_file():
            item.write_bytes(b"\x00garbage")


def _truncated_arrays(path):
    # The tree metadata survives but the array store is gone. load_checkpoint says so before
    # orbax reads: orbax reads in an event loop of its own and closes it at the first failed
    # read, while tensorstore still finishes the other reads and calls back into the closed
    # loop (pytest then reports "Event loop is closed" as unraisable).
    for item in (path / "variables").iterdir():
        if item.name not in ("_METADATA", "_CHECKPOINT_METADATA"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def _missing_extras(path):
    shutil.rmtree(path / "extras")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_corrupt_metadata, "metadata.json is not JSON"),
        (_metadata_without_model, "has no 'model' entry"),
        (_no_metadata, "is not a fippure checkpoint"),
        (_no_variables, "variables/ directory is missing"),
        (_empty_variables, "cannot read"),
        (_garbled_variables, "cannot read"),
        (_truncated_arrays, "corrupt checkpoint .*no array data"),
        (_missing_extras, "corrupt checkpoint .*extras/trigger"),
    ],
)
def test_corrupt_checkpoint(saved, damage, match):
    damage(saved)
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint(saved)
    message = str(error.value)
    assert "\n" not in message and str(saved) in message


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (("model", "kwargs"), [16], "model.kwargs must be a mapping"),
        (("model", "name"), ["small_cnn"], "model.name must be a string"),
        (("image_shape",), 32, "image_shape must be a list of three integers"),
        (("extras",), "trigger", "extras must be a list of names"),
        (("normalization",), {"mean": [0.5]}, "normalization must hold mean and std"),
        (("clean_seed",), "x", "clean_seed must be an integer"),
        (("attack",), {"name": "badnets", "options": [1]}, "attack.options must be a mapping"),
    ],
)
def test_metadata_fields_of_the_wrong_type_are_a_corrupt_checkpoint(saved, field, value, match):
    # each escaped as a TypeError or KeyError from deep inside the loaders
    meta = json.loads((saved / "metadata.json").read_text())
    *parents, name = field
    target = meta
    for key in parents:
        target = target[key]
    target[name] = value
    (saved / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint .*{match}") as error:
        load_checkpoint(saved)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 4, "depth": 3}, r"takes no argument\(s\) \['depth'\]"),
        ({"width": -2}, "width must be >= 1"),
        ({"width": "x"}, "width must be an integer"),
    ],
)
def test_model_options_the_model_refuses_are_the_checkpoints_fault(saved, kwargs, match):
    # an InvalidInputError said the model refused them, not that the checkpoint was at fault
    meta = json.loads((saved / "metadata.json").read_text())
    meta["model"]["kwargs"] = kwargs
    (saved / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint {saved}.*{match}"):
        load_checkpoint(saved)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'absent'}"):
        load_checkpoint(tmp_path / "absent")


def test_round_trip_without_batch_stats(tmp_path):
    model = create_model("vit_small", 10, width=8, depth=1, num_heads=2)
    variables = init_variables(model, jax.random.key(1), (8, 8, 1))
    assert set(variables) == {"params"}
    meta = {
        "model": model_metadata("vit_small", 10, width=8, depth=1, num_heads=2),
        "image_shape": [8, 8, 1],
    }
    loaded = load_checkpoint(save_checkpoint(tmp_path / "vit", variables, meta))
    _assert_trees_equal(loaded.variables, variables)


def test_a_model_saved_with_a_compute_dtype_is_rebuilt_with_it(tmp_path, small):
    """The dtype is a model field like the width; the float32 weights load in either dtype."""
    _, variables = small
    meta = {
        "model": model_metadata("small_cnn", 10, width=4, dtype="bfloat16"),
        "dataset": "digits",
    }
    loaded = load_checkpoint(save_checkpoint(tmp_path / "bf16", variables, meta))
    assert loaded.model == create_model("small_cnn", 10, width=4, dtype="bfloat16")
    _assert_trees_equal(loaded.variables, variables)
    # and a float32 checkpoint loads into a bfloat16 model (and back)
    again = load_checkpoint(tmp_path / "bf16", model=create_model("small_cnn", 10, width=4))
    _assert_trees_equal(again.variables, variables)


def test_results_name_the_revision_of_the_running_code(monkeypatch):
    """A long run's checkout may move on before it writes: provenance names the code that ran,
    and the revision at writing time too when they differ."""
    from fippure import provenance

    monkeypatch.setattr(provenance, "_IMPORTED_REVISION", "abc123")
    monkeypatch.setattr(provenance, "git_revision", lambda short=False: "def456")
    stamp = provenance.provenance()
    assert stamp["git_revision"] == "abc123" and stamp["git_revision_at_write"] == "def456"
    monkeypatch.setattr(provenance, "git_revision", lambda short=False: "abc123")
    assert "git_revision_at_write" not in provenance.provenance()
    # and a results table's closing line names the command, that revision, machine and date
    line = provenance.measured_by(stamp)
    assert line.startswith(f"Measured by `{stamp['command']}` at abc123 on {stamp['machine']}")
    assert line.endswith(f"{stamp['date']}.")


def test_a_stamp_left_empty_by_a_kill_is_replaced_not_a_traceback(tmp_path):
    # a run killed while an older fippure wrote run.json left it empty; every rerun then
    # failed with a JSONDecodeError
    (tmp_path / "run.json").write_text("")
    assert claim_run_directory(tmp_path, {"lr": 0.1}) is False
    assert json.loads((tmp_path / "run.json").read_text()) == {"lr": 0.1}
    assert claim_run_directory(tmp_path, {"lr": 0.1}) is True
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left
    # beside saved work an unreadable stamp cannot be judged: refused, not overwritten
    (tmp_path / "run.json").write_text("{")
    (tmp_path / "progress").mkdir()
    with pytest.raises(CheckpointError, match="run.json is unreadable"):
        claim_run_directory(tmp_path, {"lr": 0.1})


def test_a_checkpoint_saved_again_with_its_loaded_metadata_is_stamped_anew(
    saved, tmp_path, monkeypatch
):
    # the copied metadata once won: the old date and revision stayed, and the list of extras
    # named ones the new save did not write, so the checkpoint could not be loaded
    from fippure import checkpoints

    loaded = load_checkpoint(saved)
    monkeypatch.setattr(checkpoints, "code_revision", lambda: "new-revision")
    again = save_checkpoint(tmp_path / "again", loaded.variables, loaded.metadata)
    meta = read_metadata(again)
    assert meta["extras"] == [] and meta["git_revision"] == "new-revision"
    assert meta["attack"] == loaded.metadata["attack"]  # the caller's own keys are kept
    _assert_trees_equal(load_checkpoint(again).variables, loaded.variables)


def test_the_recorded_command_can_be_typed_again():
    from fippure.provenance import command_line

    main = "/site-packages/fippure/__main__.py"
    assert command_line([main, "train", "--out", "my runs/a"]) == (
        "python -m fippure train --out 'my runs/a'"
    )
    assert command_line(["/venv/bin/fippure", "demo"]) == "fippure demo"
