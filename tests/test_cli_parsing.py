"""Command-line parsing: clean-set sizes, seeds, KEY=VALUE options and the defaults the commands
pass on."""

from __future__ import annotations

import argparse

import pytest

from fippure import cli


def test_clean_size_bounds():
    one = cli.clean_size("1")
    assert one == 1 and isinstance(one, int)
    assert cli.clean_size("0.5") == 0.5
    for text in ("1.0", "1.5", "0.0"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.clean_size(text)


def test_seed_flags_take_the_largest_uint32_and_refuse_the_next():
    assert cli.seed_int(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError, match=r"must lie in \[0, 2\*\*32\)"):
        cli.seed_int(str(2**32))


def _captured(monkeypatch, name, report):
    import fippure.recipes

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return report

    monkeypatch.setattr(fippure.recipes, name, fake)
    return seen


TRAIN_REPORT = {"test_accuracy": 0.5, "epochs": 1, "wall_time_s": 1.0, "train_images_per_s": 1.0}


@pytest.mark.parametrize("overlap", [False, True])
def test_train_passes_its_clean_set_defaults_and_overlap_flag(monkeypatch, tmp_path, overlap):
    seen = _captured(monkeypatch, "train_classifier", TRAIN_REPORT)
    argv = ["train", "--dataset", "digits", "--model", "small_cnn", "--out", str(tmp_path)]
    assert cli.main(argv + (["--clean-overlap"] if overlap else [])) == 0
    assert seen["clean_size"] == 0.01 and seen["clean_seed"] == 0
    assert seen["clean_disjoint"] is (not overlap)


def test_attack_targets_class_0_by_default(monkeypatch, tmp_path):
    report = {
        **TRAIN_REPORT,
        "asr": 1.0,
        "ra": 0.0,
        "train_examples": 100,
        "attack": {"realised_ratio": 0.1, "num_poisoned": 10},
    }
    seen = _captured(monkeypatch, "train_backdoored", report)
    argv = ["attack", "--dataset", "digits", "--model", "small_cnn", "--attack", "badnets"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert seen["target"] == 0 and seen["mode"] == "all_to_one" and seen["ratio"] == 0.1


def test_an_option_value_may_hold_an_equals_sign():
    assert cli.key_value("mask_pattern=^bn(?=2)") == ("mask_pattern", "^bn(?=2)")
    assert cli.key_value(" steps = 3 ") == ("steps", "3")
