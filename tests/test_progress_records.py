"""``history.json``: the history and one record per save for the last two saves, so that a run
resumed from the save before the last still finds what was saved with it."""

from __future__ import annotations

import json

from fippure.progress_records import (
    empty_progress,
    read_progress,
    resume_from,
    write_progress,
)

HISTORY = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.2}]


def test_the_file_keeps_the_records_of_the_last_two_saves(tmp_path):
    saves = empty_progress()["saves"]
    for step in (10, 20, 30):
        saves = write_progress(tmp_path, HISTORY[: step // 10], saves, step, elapsed_s=step / 10)
    saved = read_progress(tmp_path)
    assert saved["saves"] == [{"step": 20, "elapsed_s": 2.0}, {"step": 30, "elapsed_s": 3.0}]
    assert saved["history"] == HISTORY


def test_a_run_resumed_from_the_save_before_the_last_takes_that_saves_record(tmp_path):
    saves = write_progress(tmp_path, HISTORY[:1], [], 15, elapsed_s=1.5, final={"acc": 0.5})
    write_progress(tmp_path, HISTORY[:2], saves, 25, elapsed_s=2.5, final={"acc": 0.6})
    history, record, kept = resume_from(read_progress(tmp_path), 15, steps_per_epoch=10)
    assert history == HISTORY[:1]  # epoch 2 ended at step 20, after the restored step
    assert record == {"step": 15, "elapsed_s": 1.5, "final": {"acc": 0.5}}
    assert kept == [record]  # the lost save's record is dropped
    # the next save at step 25 keeps the record of 15, not the stale one of 25
    again = write_progress(tmp_path, history, kept, 25, elapsed_s=2.6)
    assert again == [record, {"step": 25, "elapsed_s": 2.6}]


def test_a_run_with_no_checkpoint_starts_afresh_whatever_the_file_says(tmp_path):
    write_progress(tmp_path, HISTORY[:1], [], 10, elapsed_s=1.0)
    assert resume_from(read_progress(tmp_path), 0, steps_per_epoch=10) == ([], {}, [])
    assert read_progress(tmp_path / "elsewhere") == empty_progress()


def test_files_of_an_older_fippure_are_read_as_a_record_without_a_step(tmp_path):
    """One record for the last save (the form before per-save records), or only the history
    list (the form before the elapsed time): a run that restored a checkpoint takes it."""
    path = tmp_path / "history.json"
    path.write_text(json.dumps({"history": HISTORY, "elapsed_s": 4.0, "epoch_so_far": None}))
    history, record, kept = resume_from(read_progress(tmp_path), 20, steps_per_epoch=10)
    assert history == HISTORY[:2]
    assert record == {"step": None, "elapsed_s": 4.0, "epoch_so_far": None}
    assert kept == []
    path.write_text(json.dumps(HISTORY))
    assert resume_from(read_progress(tmp_path), 30, steps_per_epoch=10)[:2] == (
        HISTORY,
        {"step": None},
    )
