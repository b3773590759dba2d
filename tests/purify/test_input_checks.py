"""Inputs a defense cannot use are refused in one line, before any work (audit of 2026-12-07).

Each case here once ran the wrong thing silently or failed deep inside JAX or NumPy.
"""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from fippure import cli
from fippure.errors import CheckpointError, InvalidInputError
from fippure.purify import make_config
from fippure.purify.clean_stop import purify_with_clean_stop
from fippure.purify.registry import get_defense
from fippure.purify.runner import run_defense
from fippure.purify.trigger_inversion import InversionConfig, invert_trigger, scan_classes
from fippure.zoo import load_backdoored


@pytest.mark.parametrize(("name", "other"), [("ft", "ft_sam"), ("ft_sam", "ft")])
def test_ft_and_ft_sam_each_refuse_the_others_config(digits_badnets, name, other):
    # FTSAMConfig subclasses FTConfig, and ft.purify takes both: by name, each is refused
    bd = digits_badnets
    with pytest.raises(InvalidInputError, match=f"^{name} takes a .*Config, got .*Config"):
        get_defense(name).purify(bd.model, bd.variables, bd.clean, make_config(other))


@pytest.mark.parametrize("name", ["fip", "fast_fip", "ft", "nft", "ngf"])
def test_a_tuple_clean_set_or_bare_params_are_refused(digits_badnets, name):
    bd = digits_badnets
    purify = get_defense(name).purify
    pair = (bd.clean.images, bd.clean.labels)
    with pytest.raises(InvalidInputError, match="clean set must be an ImageDataset, got tuple"):
        purify(bd.model, bd.variables, pair, make_config(name))
    with pytest.raises(InvalidInputError, match="variables must be the model's collections"):
        purify(bd.model, bd.variables["params"], bd.clean, make_config(name))


def test_trigger_inversion_takes_its_own_config_and_a_seed(digits_badnets):
    bd = digits_badnets
    with pytest.raises(InvalidInputError, match="scan_classes takes an InversionConfig, got dict"):
        scan_classes(bd.model, bd.variables, bd.clean, {"steps": 2})
    with pytest.raises(InvalidInputError, match="takes an InversionConfig, got FIPConfig"):
        invert_trigger(bd.model, bd.variables, bd.clean, 0, make_config("fip"))
    config = InversionConfig(steps=2, batch_size=16)
    by_seed = invert_trigger(bd.model, bd.variables, bd.clean, 0, config, 3)
    by_key = invert_trigger(bd.model, bd.variables, bd.clean, 0, config, jax.random.key(3))
    np.testing.assert_array_equal(by_seed.mask, by_key.mask)


def test_the_clean_stop_refuses_settings_that_are_not_a_clean_stop_config(digits_badnets):
    bd = digits_badnets
    with pytest.raises(InvalidInputError, match="must be a CleanStopConfig, got dict"):
        purify_with_clean_stop(
            "ft", bd.model, bd.variables, bd.clean, make_config("ft"), stop={"max_steps": 2}
        )


@pytest.mark.parametrize("seed", [2**32, -1, 1.5, True])
def test_run_defense_refuses_a_seed_that_would_alias_another(digits_badnets, seed):
    with pytest.raises(InvalidInputError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        run_defense(digits_badnets, "ft", overrides={"steps": "1"}, seed=seed, progress=False)


def test_an_output_directory_inside_the_source_checkpoint_is_refused(digits_badnets_path):
    with pytest.raises(CheckpointError, match="lies inside the source checkpoint"):
        run_defense(
            digits_badnets_path,
            "ft",
            overrides={"steps": "1"},
            out=digits_badnets_path / "variables" / "purified",
            progress=False,
        )
    assert not (digits_badnets_path / "variables" / "purified").exists()


def _edited_copy(source, tmp_path, edit):
    copy = tmp_path / "checkpoint"
    shutil.copytree(source, copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    edit(metadata)
    (copy / "metadata.json").write_text(json.dumps(metadata))
    return copy


def _set_attack(key, value):
    return lambda m: m["attack"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.__setitem__("clean_indices", [*m["clean_indices"], 10**6]), "outside"),
        (lambda m: m.__setitem__("clean_indices", [-1, *m["clean_indices"][1:]]), "outside"),
        (lambda m: m.__setitem__("clean_indices", m["clean_indices"] * 2), "repeats an image"),
        (lambda m: m.__setitem__("clean_indices", "abc"), "not a non-empty list"),
        (_set_attack("target", 12), "target 12 is out of range for 10 classes"),
        (_set_attack("mode", "foo"), "unknown attack mode 'foo'"),
        (_set_attack("ratio", 5), r"poison ratio must be in \(0, 1\)"),
        (lambda m: m.__setitem__("image_shape", [16, 16, 1]), r"made for \(16, 16, 1\) images"),
    ],
    ids=[
        "index_too_large",
        "negative_index",
        "repeated",
        "not_a_list",
        "target",
        "mode",
        "ratio",
        "image_shape",
    ],  # fmt: skip
)
def test_a_checkpoint_with_impossible_metadata_is_refused(
    digits_badnets_path, tmp_path, edit, message
):
    copy = _edited_copy(digits_badnets_path, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_backdoored(copy)


def test_detect_checks_its_output_directory_before_scanning(digits_badnets_path, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    code = cli.main(["detect", "--checkpoint", str(digits_badnets_path), "--out", str(afile)])
    assert code == 2
    err = capsys.readouterr().err
    assert "is a file; give a directory" in err and "Traceback" not in err
    assert "trigger inversion" not in err  # refused before the scan's progress bar


@pytest.mark.parametrize("flag", ["--set", "--stop-set"])
def test_a_key_given_twice_is_refused(digits_badnets_path, tmp_path, capsys, flag):
    extra = ["--stop-on-clean-set"] if flag == "--stop-set" else []
    key = "max_steps" if flag == "--stop-set" else "steps"
    argv = ["purify", "--checkpoint", str(digits_badnets_path), "--defense", "ft",
            "--out", str(tmp_path / "run"), *extra, flag, f"{key}=2", flag, f"{key}=3"]  # fmt: skip
    assert cli.main(argv) == 2
    assert f"{flag} {key} given more than once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _HeadWithoutFeatures(nn.Module):
    """A user's model with a dense ``head`` that does not sow the head's inputs."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def test_ngf_names_the_head_inputs_a_users_model_does_not_record(digits_badnets):
    # the dense head solver read them with a bare KeyError: 'intermediates'
    model = _HeadWithoutFeatures()
    variables = model.init(jax.random.key(0), digits_badnets.clean.images[:1] / 255.0)
    config = make_config("ngf", {"steps": 2})
    with pytest.raises(InvalidInputError, match=r"does not record its head's inputs.*solver=cg"):
        get_defense("ngf").purify(model, variables, digits_badnets.clean, config, 0, progress=False)
    cg = make_config("ngf", {"steps": 2, "solver": "cg"})
    _, report = get_defense("ngf").purify(
        model, variables, digits_badnets.clean, cg, 0, progress=False
    )
    assert report.steps == 2 and report.extra["solver"] == "cg"


class _WithNoise(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3))(x)).mean((1, 2))
        if train:  # a random stream the defenses do not give (they give 'dropout')
            x = x + jax.random.normal(self.make_rng("noise"), x.shape)
        return nn.Dense(10)(x)


@pytest.mark.parametrize("defense", ["ft", "fip", "nft"])
def test_a_model_the_defenses_cannot_train_is_refused_in_one_line(digits_badnets, defense):
    # a model that needs a random stream of its own (InvalidRngError) and an extra collection
    # (ScopeCollectionNotFound) once failed deep inside Flax, in the jitted step
    clean = digits_badnets.clean
    config = make_config(defense, {"steps": 1})
    model = _WithNoise()
    variables = model.init(jax.random.key(0), clean.images[:1] / 255.0)
    with pytest.raises(InvalidInputError, match="cannot run in train mode.*'dropout' stream"):
        get_defense(defense).purify(model, variables, clean, config, 0, progress=False)
    if defense == "ft":  # NGF runs the model in eval mode only, where it draws nothing
        ngf_config = make_config("ngf", {"steps": 1, "layer": "Dense_0", "solver": "cg"})
        get_defense("ngf").purify(model, variables, clean, ngf_config, 0, progress=False)
    b = digits_badnets
    extra = {**b.variables, "cache": {"x": np.zeros(1)}}
    with pytest.raises(InvalidInputError, match="collections the defenses do not carry: cache"):
        get_defense(defense).purify(b.model, extra, clean, config, 0, progress=False)
