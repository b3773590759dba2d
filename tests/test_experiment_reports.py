"""The experiment scripts' report writers: test-chosen settings are named, provenance is kept.

Pure Python on small dicts; nothing is trained or loaded.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types

import numpy as np
import pytest

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


def test_a_stored_result_measured_under_another_rule_stops_the_script(tmp_path):
    import trigger_synthesis_check as scans

    rule = {"threshold": 0.05, "every": 10, "max_steps": 150}
    (tmp_path / "badnets.json").write_text(json.dumps({"attack": "badnets", "rule": rule}))

    def run(attack):
        raise AssertionError("a stored attack is not run again")

    assert scans.per_attack(["badnets"], tmp_path, run, False, {"rule": rule})
    # a field the stored result lacks (recorded only later) is not compared
    assert scans.per_attack(["badnets"], tmp_path, run, False, {"rule": {**rule, "new": 1}})
    with pytest.raises(SystemExit, match=r"rule\.threshold = 0\.05, not 0\.5"):
        scans.per_attack(["badnets"], tmp_path, run, False, {"rule": {**rule, "threshold": 0.5}})
    # --report-only only reads what is stored
    assert scans.per_attack(["badnets"], tmp_path, run, True, {"rule": {"threshold": 0.5}})


def test_a_new_seed_is_refused_where_the_variants_other_seeds_ran_under_another_rule(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(clean_set_stop, "OUT", tmp_path)
    stored = clean_set_stop.stop_rule(0.05, 10, 150, True)
    (tmp_path / "badnets.json").write_text(json.dumps({"attack": "badnets", "rule": stored}))
    clean_set_stop.check_rule(
        ["badnets"], clean_set_stop.METHOD, clean_set_stop.SETTING, True, stored
    )
    with pytest.raises(SystemExit, match=r"badnets\.json was measured with rule\.max_steps = 150"):
        clean_set_stop.check_rule(
            ["badnets"],
            clean_set_stop.METHOD,
            clean_set_stop.SETTING,
            True,
            clean_set_stop.stop_rule(0.05, 10, 200, True),
        )


def test_a_summary_of_some_attacks_keeps_every_stored_attacks_rows(tmp_path):
    import trigger_synthesis_check as scans

    (tmp_path / "seed1").mkdir()
    for path in (tmp_path / "sig.json", tmp_path / "seed1" / "lf.json"):
        path.write_text("{}")
    assert scans.stored_attacks(["badnets", "blend"], ["wanet"], tmp_path) == [
        "badnets",
        "blend",
        "wanet",
        "lf",
        "sig",
    ]


def test_a_scan_saved_with_other_inversion_settings_is_not_reused(tmp_path, monkeypatch):
    import trigger_synthesis_check as scans

    path = tmp_path / "badnets_triggers.npz"
    scan = types.SimpleNamespace(
        triggers=[types.SimpleNamespace(mask=np.zeros((2, 2)), pattern=np.zeros((2, 2, 3)))]
    )
    monkeypatch.setattr(scans, "INVERSION", {"steps": 10, "batch_size": 4})
    scans.save_scan(path, scan)
    monkeypatch.setattr(scans, "INVERSION", {"steps": 20, "batch_size": 4})
    with pytest.raises(SystemExit, match=r"scanned with steps = 10, not 20"):
        scans.load_scan(path, None, None, None, None)


def test_quantised_asr_on_some_entries_keeps_the_others_rows_and_their_provenance(
    tmp_path, monkeypatch
):
    import quantised_asr

    old = {"command": "quantised_asr.py", "git_revision": "a", "machine": "m", "date": "d1"}
    rows = [{"entry": e, "asr_float32": 0.9} for e in ("badnets", "wanet")]
    (tmp_path / "quantised_asr.json").write_text(json.dumps({"rows": rows, **old}))
    monkeypatch.setattr(quantised_asr, "RESULTS", tmp_path)
    new = {**old, "command": "quantised_asr.py wanet", "git_revision": "b", "date": "d2"}
    measured = {"wanet": {"entry": "wanet", "asr_float32": 0.8, "provenance": new}}
    merged = quantised_asr.merge_rows(
        quantised_asr.stored_rows(), measured, ["badnets", "blend", "wanet"]
    )
    assert [(r["entry"], r["asr_float32"]) for r in merged] == [("badnets", 0.9), ("wanet", 0.8)]
    assert merged[0]["provenance"] == old
    lines = quantised_asr.provenance_lines(merged)
    assert len(lines) == 2
    assert lines[0].startswith("- badnets: Measured by `quantised_asr.py` at a")
    assert lines[1].startswith("- wanet: Measured by `quantised_asr.py wanet` at b")


def test_the_zoo_scripts_default_run_leaves_the_retired_entries_out():
    import attack_zoo

    zoo = pathlib.Path(attack_zoo.__file__).resolve().parents[1] / "zoo" / "cifar10"
    assert attack_zoo.RETIRED <= set(attack_zoo.ENTRIES)
    assert not attack_zoo.RETIRED & set(attack_zoo.DEFAULT_ENTRIES)
    for entry in attack_zoo.DEFAULT_ENTRIES:  # everything else is in the zoo already
        assert (zoo / "preact_resnet18_w16" / entry / "metadata.json").exists(), entry
