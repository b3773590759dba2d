"""The long attack fits (ISSBA's encoder, LF's pattern, CLB's PGD) checkpoint and resume.

A fit stopped part-way (``stop_after_steps``, or an exception after a save) and called again
with the same ``workdir`` continues from the save and returns exactly what an uninterrupted
fit returns; progress of another fit is refused; without a ``workdir`` nothing is written.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from attack_fits import CLB, ISSBA, LF, poisoned_context, untrained_reference

from fippure.attacks import make_attack
from fippure.attacks.fit_checkpoints import FitProgress
from fippure.data.sources import load_dataset
from fippure.errors import CheckpointError
from fippure.models.registry import init_variables
from fippure.recipes import _fitted_attack_state


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def reference(digits):
    return untrained_reference(digits)


def _fit(attack, context, **kwargs):
    return attack.fit(attack.init_state(jax.random.key(1), context.spec), context, **kwargs)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _fit_writing_nothing(attack, context, tmp_path, monkeypatch):
    """The uninterrupted fit, run without a workdir from an empty working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    state = _fit(attack, context)
    assert list(cwd.iterdir()) == []
    return state


@pytest.fixture
def restored_at(monkeypatch):
    """The step each :meth:`FitProgress.restore` resumed at."""
    steps = []
    original = FitProgress.restore

    def spy(self, carry):
        step, carry = original(self, carry)
        steps.append(step)
        return step, carry

    monkeypatch.setattr(FitProgress, "restore", spy)
    return steps


def _saved_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_issba_fit_resumes_to_the_uninterrupted_result(digits, tmp_path, monkeypatch, restored_at):
    attack, context = make_attack("issba", **ISSBA), poisoned_context(digits)
    whole = _fit_writing_nothing(attack, context, tmp_path, monkeypatch)
    progress = tmp_path / "progress"
    partial = _fit(attack, context, workdir=progress, checkpoint_every=10, stop_after_steps=15)
    assert _saved_steps(progress) == [15] and (progress / "run.json").is_file()
    assert not np.array_equal(
        partial["decoder"]["Dense_0"]["kernel"], whole["decoder"]["Dense_0"]["kernel"]
    )
    resumed = _fit(attack, context, workdir=progress, checkpoint_every=10)
    assert restored_at == [0, 15]  # the first fit started afresh
    _assert_trees_equal(resumed, whole)
    assert _saved_steps(progress) == [30]
    # a finished fit called again returns its result without stepping
    _assert_trees_equal(_fit(attack, context, workdir=progress), whole)
    assert restored_at == [0, 15, 30]


def test_lf_fit_killed_between_saves_resumes_from_the_last_one(
    digits, reference, tmp_path, monkeypatch, restored_at
):
    attack, context = make_attack("lf", **LF), poisoned_context(digits, reference)
    whole = _fit_writing_nothing(attack, context, tmp_path, monkeypatch)
    original = FitProgress.save

    def save_then_die(self, step, carry, what):
        original(self, step, carry, what)
        if step == 20:
            raise KeyboardInterrupt  # a kill after step 20's save, before step 30's

    progress = tmp_path / "progress"
    with monkeypatch.context() as patch:
        patch.setattr(FitProgress, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            _fit(attack, context, workdir=progress, checkpoint_every=10)
    assert _saved_steps(progress) == [20]
    resumed = _fit(attack, context, workdir=progress, checkpoint_every=10)
    assert restored_at == [0, 20]
    _assert_trees_equal(resumed, whole)


def test_clb_fit_resumes_at_the_next_pgd_batch(
    digits, reference, tmp_path, monkeypatch, restored_at
):
    attack = make_attack("clb", **CLB)
    context = poisoned_context(digits, reference, clean_label=True, ratio=0.02)
    count = len(context.plan.indices)
    assert count > 3 * CLB["pgd_batch_size"] and count % CLB["pgd_batch_size"]  # a short last
    whole = _fit_writing_nothing(attack, context, tmp_path, monkeypatch)
    progress = tmp_path / "progress"
    partial = _fit(attack, context, workdir=progress, stop_after_steps=2)
    assert partial["adversarial_images"].shape[0] == 2 * CLB["pgd_batch_size"]
    np.testing.assert_array_equal(
        partial["adversarial_images"], whole["adversarial_images"][: 2 * CLB["pgd_batch_size"]]
    )
    resumed = _fit(attack, context, workdir=progress)
    assert restored_at == [0, 2]
    assert resumed["adversarial_images"].dtype == np.uint8
    np.testing.assert_array_equal(resumed["adversarial_images"], whole["adversarial_images"])


@pytest.fixture(scope="module")
def lf_progress(digits, reference, tmp_path_factory):
    """A directory holding one saved step of an LF fit."""
    progress = tmp_path_factory.mktemp("lf") / "progress"
    _fit(
        make_attack("lf", **LF),
        poisoned_context(digits, reference),
        workdir=progress,
        stop_after_steps=1,
    )
    return progress


@pytest.mark.parametrize(
    "change, differs",
    [
        ("options", "attack_options"),
        ("attack", "attack, attack_options, initial_state"),
        ("seed", "key"),
        ("train_size", "poison_plan, train_set, train_size"),
        ("reference", "reference"),
    ],
)
def test_progress_of_another_fit_is_refused(lf_progress, digits, reference, change, differs):
    attack, data, seed = make_attack("lf", **LF), digits, 5
    if change == "options":
        attack = make_attack("lf", **{**LF, "eps": 0.1})
    elif change == "attack":
        attack = make_attack("issba", **ISSBA)
    elif change == "seed":
        seed = 6
    elif change == "train_size":
        data = digits.subset(np.arange(1000), "train-subset")
    elif change == "reference":
        reference = (reference[0], init_variables(reference[0], jax.random.key(4), (8, 8, 1)))
    context = poisoned_context(data, reference, seed=seed)
    with pytest.raises(CheckpointError) as error:
        _fit(attack, context, workdir=lf_progress)
    message = str(error.value)
    assert message == (
        f"{lf_progress} holds a run with a different {differs}; "
        "use another --out directory or delete it"
    )
    assert _saved_steps(lf_progress) == [1]  # left alone


def test_attack_command_resumes_the_fit_and_drops_its_progress(
    digits, reference, tmp_path, restored_at
):
    """``fippure attack`` fits in ``out/attack_fit_progress`` and keeps only ``attack_fit``."""
    attack, context = make_attack("lf", **LF), poisoned_context(digits, reference)
    key = jax.random.key(1)
    out = tmp_path / "out"
    whole = _fit(attack, context)
    attack.fit(
        attack.init_state(key, context.spec),
        context,
        workdir=out / "attack_fit_progress",
        stop_after_steps=25,
    )
    state = _fitted_attack_state(attack, context, key, out)
    assert restored_at == [0, 25]
    _assert_trees_equal(state, whole)
    assert sorted(p.name for p in out.iterdir()) == ["attack_fit"]
    _assert_trees_equal(_fitted_attack_state(attack, context, key, out), whole)  # the cache
