"""The experiment scripts' report writers: test-chosen settings are named, provenance is kept.

Pure Python on small dicts; nothing is trained or loaded.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types

import numpy as np

import fippure.purify.runner as runner

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import clean_set_stop  # noqa: E402
import purify_benchmark  # noqa: E402
import rerun_check  # noqa: E402


def test_nft_brief_unaugmented_has_no_held_out_core_cell():
    # nft_levers.md probed it on all six core attacks (seed 0, test split) before it entered
    # the grid
    assert not any(
        purify_benchmark.held_out(a, "nft", "brief_unaugmented")
        for a in purify_benchmark.CORE_ATTACKS
    )


def test_clean_stop_reports_name_the_settings_chosen_with_test_data():
    text = "\n".join(
        clean_set_stop.chosen_on_test_lines(
            [("fip", "brief_transfer"), ("fip", "brief_transfer"), ("ngf", "default")]
        )
    )
    assert "Chosen with test data" in text
    assert "`fip brief_transfer` (badnets, blend)" in text
    assert text.count("fip brief_transfer") == 1 and "ngf" not in text
    assert clean_set_stop.chosen_on_test_lines([("ngf", "default"), ("ft", "gentle")]) == []


def test_rerun_table_records_commands_and_its_own_provenance(tmp_path, monkeypatch):
    run = {"acc": 0.8, "asr": 0.1, "ra": 0.5}
    stamp = {"git_revision": "a" * 40, "date": "2026-01-01T00:00:00Z"}
    (tmp_path / "x__fip__default__s0.json").write_text(
        json.dumps(
            {
                "name": "x__fip__default__s0",
                "stored": {"after": run, "command": "stored.py --a", "machine": "m1", **stamp},
                "rerun": {"after": run, "command": "rerun_check.py x", "machine": "m2", **stamp},
                "max_abs_difference": 0.0,
            }
        )
    )
    table = tmp_path / "reruns.md"
    monkeypatch.setattr(rerun_check, "OUT", tmp_path)
    monkeypatch.setattr(rerun_check, "TABLE", table)
    rerun_check.write_table()
    text = table.read_text()
    assert "`stored.py --a` on m1; `rerun_check.py x` on m2" in text
    assert "Table written by `" in text


def test_a_stored_run_on_another_clean_set_is_run_again(tmp_path, monkeypatch):
    def backdoored(indices):
        meta = {"created": "2026-01-01", "git_revision": "a" * 40}
        return types.SimpleNamespace(
            checkpoint=types.SimpleNamespace(metadata=meta), clean_indices=np.asarray(indices)
        )

    calls = []

    def fake_run_defense(model, method, **kw):
        calls.append(model.clean_indices.tolist())
        return {"after": {"acc": 0.5, "asr": 0.1}, "report": {"wall_time_s": 1.0}}

    monkeypatch.setattr(runner, "run_defense", fake_run_defense)
    before = {"acc": 0.9, "asr": 1.0}

    def run(indices):
        return purify_benchmark.run_one(
            backdoored(indices), "badnets", "nft", "default", 0, before, tag="clean10",
            runs=tmp_path,
        )  # fmt: skip

    stored = run([3, 1, 4])
    assert stored["clean_set"]["size"] == 3
    assert run([3, 1, 4]) == stored and len(calls) == 1  # the stored run is reused
    assert run([3, 1, 5])["clean_set"] != stored["clean_set"] and len(calls) == 2
