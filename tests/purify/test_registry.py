"""Defense names and ``--set key=value`` overrides are validated with one-line errors."""

from __future__ import annotations

import pytest

from fippure.errors import InvalidInputError, UnknownNameError
from fippure.purify import DEFENSES, make_config


def test_every_registered_defense_has_a_default_config():
    for name in DEFENSES:
        config = make_config(name)
        assert config.steps > 0


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("steps", "300", 300),
        ("learning_rate", "1e-3", 1e-3),
        ("augment", "false", False),
        ("schedule", "constant", "constant"),
    ],
)
def test_string_overrides_are_parsed_to_the_field_type(key, raw, expected):
    assert getattr(make_config("ft", {key: raw}), key) == expected


@pytest.mark.parametrize(
    ("overrides", "error", "fragment"),
    [
        ({"stepz": "10"}, UnknownNameError, "Did you mean 'steps'"),
        ({"steps": "1.5"}, InvalidInputError, "must be an integer"),
        ({"learning_rate": "fast"}, InvalidInputError, "must be a number"),
        ({"schedule": "linear"}, InvalidInputError, "one of"),
        ({"augment": "maybe"}, InvalidInputError, "true or false"),
        # Python values are judged as they are, not rounded: 3.7 steps is no integer
        ({"steps": 3.7}, InvalidInputError, "FTConfig.steps must be an integer, got 3.7"),
        ({"steps": True}, InvalidInputError, "FTConfig.steps must be an integer, got True"),
        ({"learning_rate": None}, InvalidInputError, "FTConfig.learning_rate must be a number"),
    ],
)
def test_bad_overrides_raise_clear_errors(overrides, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        make_config("ft", overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("defense", "key"), [("nft", "mask_pattern"), ("fast_fip", "kernel_pattern")]
)
def test_a_bad_regular_expression_is_refused_when_the_config_is_built(defense, key):
    with pytest.raises(InvalidInputError, match=f"{key} must be a valid regular expression"):
        make_config(defense, {key: "conv[1"})


@pytest.mark.parametrize("none", [None, "none", "None", "null"])
def test_an_optional_field_is_switched_off_by_none_in_python_or_text(none):
    assert make_config("fip", {"max_grad_norm": none}).max_grad_norm is None
    assert make_config("fip", {"max_grad_norm": 3}).max_grad_norm == 3


def test_unknown_defense_is_named():
    with pytest.raises(UnknownNameError, match="unknown defense 'fipp'"):
        make_config("fipp")
