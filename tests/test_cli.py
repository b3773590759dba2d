"""The ``fippure`` command line: help, one-line errors with exit status 2, and its options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from fippure import cli
from fippure.checkpoints import load_checkpoint


def _one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{text}"
    assert "Traceback" not in text
    assert lines[0].startswith("fippure")
    return lines[0]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in cli.COMMANDS
    for name in cli.COMMANDS:
        assert f"\n    {name} " in out, name


def test_train_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--dataset", "--model", "--width", "--epochs", "--clean", "--out"):
        assert option in out


def test_every_flag_has_help_that_states_its_default():
    """``--epochs``, ``--seed`` and a dozen other flags had no help text, and none showed its
    default; ``--mode`` took free text."""
    from fippure.attacks.poisoning import MODES

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = formatter._get_help_string(action) % {"default": action.default}
            default = action.default
            if not (default is None or isinstance(default, bool) or default == []):
                assert f"default: {action.default}" in shown or "default" in action.help, (
                    name,
                    action.option_strings[0],
                )
    mode = next(a for a in commands["attack"]._actions if a.dest == "mode")
    assert tuple(mode.choices) == MODES


def test_the_name_flags_list_every_registered_name():
    # the lists are written out (importing the registries would load JAX for --help); this
    # keeps them in step with the registries
    from fippure.attacks import ATTACKS
    from fippure.models.registry import MODELS
    from fippure.purify.registry import DEFENSES

    commands = cli.build_parser()._subparsers._group_actions[0].choices

    def listed(command, dest):
        action = next(a for a in commands[command]._actions if a.dest == dest)
        return set(action.help.replace(" or ", ", ").split(", "))

    assert listed("attack", "attack") == set(ATTACKS)
    assert listed("train", "model") == listed("attack", "model") == set(MODELS)
    assert listed("purify", "defense") == set(DEFENSES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--out", "x", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["train", "--out", "x", "--clean", "0"], "argument --clean: expected a count >= 1"),
        (["train", "--out", "x", "--clean", "-0.5"], "argument --clean: expected a count >= 1"),
        (["train", "--out", "x", "--clean", "ten"], "expected a count or a fraction, got 'ten'"),
        (["train", "--out", "x", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["train", "--out", "x", "--schedule", "step"], "argument --schedule: invalid choice"),
        (["train", "--dataset", "digits"], "the following arguments are required: --out"),
        (["train", "--out", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    line = _one_line_error(capsys.readouterr().err)
    assert message in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dataset", "cifar11"], "unknown dataset 'cifar11'; known: cifar10, cifar100, "),
        (["--dataset", "digits", "--model", "resnet"], "unknown model 'resnet'; known: "),
        (["--dataset", "digits", "--model", "small_cnn", "--width", "0"], "width must be >= 1"),
        (["--dataset", "digits", "--model", "small_cnn", "--epochs", "0"], "epochs must be >= 1"),
        (["--dataset", "digits", "--model", "small_cnn", "--lr", "-1"], "learning_rate must be"),
    ],
)
def test_bad_values(capsys, tmp_path, extra, message):
    code = cli.main(["train", "--out", str(tmp_path / "run"), *extra])
    assert code == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("fippure: error: ") and message in line
    assert not (tmp_path / "run").exists()  # failed before doing any work


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--attack", "blend", "--option", "alpha=0.1", "--option", "alpha=0.2"],
            "--option alpha given more than once",
        ),
        (
            ["--attack", "blend", "--reference", "somewhere"],
            "attack blend does not use a reference model",
        ),
        (  # it was ignored, yet recorded as the attack's target
            ["--attack", "trojan", "--mode", "all_to_all", "--target", "3"],
            "--target does not apply to --mode all_to_all",
        ),
    ],
)
def test_bad_attack_arguments(capsys, tmp_path, extra, message):
    argv = ["attack", "--dataset", "digits", "--model", "small_cnn", "--out", str(tmp_path / "run")]
    code = cli.main([*argv, *extra])
    assert code == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("fippure: error: ") and message in line
    assert not (tmp_path / "run").exists()


def test_unknown_model_suggests_the_close_name(capsys, tmp_path):
    cli.main(["train", "--out", str(tmp_path), "--dataset", "digits", "--model", "small-cnn"])
    assert "Did you mean 'small_cnn'?" in capsys.readouterr().err


def test_installed_entry_point_in_a_subprocess(tmp_path):
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "fippure", *args], capture_output=True, text=True, timeout=120
    )
    shown = run("--help")
    assert shown.returncode == 0 and "train" in shown.stdout
    failed = run("train", "--dataset", "imagenet", "--out", str(tmp_path / "x"))
    assert failed.returncode == 2
    assert "unknown dataset 'imagenet'" in _one_line_error(failed.stderr)


def test_experiment_scripts_report_fippure_errors_in_one_line(capsys):
    """``run_script`` gives an experiment script the CLI's error handling."""
    from fippure.errors import InvalidInputError

    def main():
        raise InvalidInputError("unknown attack 'badnet'")

    with pytest.raises(SystemExit) as exit_info:
        cli.run_script(main, "probe_defense.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "probe_defense.py: error: unknown attack 'badnet'\n"


@pytest.mark.parametrize("flag", ["--seed", "--clean-seed"])
def test_seed_flags_refuse_negative_seeds(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dataset", "digits", "--out", "x", flag, "-1"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must lie in [0, 2**32), got -1" in capsys.readouterr().err


def test_train_in_bfloat16_saves_the_dtype_with_the_model(tmp_path, capsys):
    out = tmp_path / "bf16"
    argv = ["train", "--dataset", "digits", "--model", "small_cnn", "--width", "4"]
    code = cli.main([*argv, "--dtype", "bfloat16", "--epochs", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[-1])["test_accuracy"] <= 1
    loaded = load_checkpoint(out)
    assert loaded.metadata["model"]["kwargs"] == {"width": 4, "dtype": "bfloat16"}
    assert loaded.model.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.variables)} == {np.dtype("float32")}


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
