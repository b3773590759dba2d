"""Hyper-parameter dataclasses reject bad values when they are built, with one-line errors
that name the field (not a ZeroDivisionError or a NaN from inside a jitted step)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pytest

from fippure.config_checks import (
    AT_LEAST_ONE,
    BELOW_ONE,
    POSITIVE,
    at_least,
    check_config,
    check_type,
    interval,
)
from fippure.curvature.analysis import AnalysisConfig
from fippure.errors import InvalidInputError, UnknownNameError
from fippure.purify import DEFENSES, make_config
from fippure.purify.fip import FIPConfig
from fippure.purify.ft import FTSAMConfig
from fippure.purify.nft import NFTConfig
from fippure.purify.ngf import NGFConfig


@dataclasses.dataclass(frozen=True)
class _Example:
    steps: int = 10
    rate: float = 0.1
    momentum: float = 0.9
    mode: Literal["a", "b"] = "a"
    clip: float | None = None
    flag: bool = True

    def __post_init__(self):
        check_config(self, {"steps": AT_LEAST_ONE, "rate": POSITIVE, "momentum": BELOW_ONE})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "_Example.steps must be >= 1, got 0"),
        ({"steps": 2.5}, "_Example.steps must be an integer, got 2.5"),
        ({"steps": True}, "_Example.steps must be an integer, got True"),
        ({"rate": -1.0}, "_Example.rate must be > 0, got -1.0"),
        ({"rate": float("nan")}, "_Example.rate must be finite, got nan"),
        ({"rate": "fast"}, "_Example.rate must be a number, got 'fast'"),
        ({"momentum": 1.0}, "_Example.momentum must be in [0, 1), got 1.0"),
        ({"mode": "c"}, "_Example.mode must be one of ['a', 'b'], got 'c'"),
        ({"clip": float("inf")}, "_Example.clip must be finite, got inf"),
        ({"flag": 1}, "_Example.flag must be true or false, got 1"),
    ],
)
def test_a_bad_field_is_named_with_its_requirement(changes, message):
    with pytest.raises(InvalidInputError) as info:
        _Example(**changes)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("rule", "accepted", "rejected", "requirement"),
    [
        (interval(0, 1), [0, 0.5, 1], [-0.1, 1.1], "in [0, 1]"),
        (interval(0, 1, low_open=True), [0.01, 1], [0, 1.5], "in (0, 1]"),
        (interval(0, 0.5, high_open=True), [0, 0.49], [0.5, -1], "in [0, 0.5)"),
        (interval(2, 256), [2, 8, 256], [1, 257], "in [2, 256]"),
        (at_least(2), [2, 3.5], [1.99], ">= 2"),
    ],
)
def test_interval_rules_test_their_ends_and_say_so(rule, accepted, rejected, requirement):
    test, said = rule
    assert said == requirement
    assert all(test(v) for v in accepted)
    assert not any(test(v) for v in rejected)


def test_good_values_pass_including_numpy_scalars_and_none():
    _Example(steps=np.int64(3), rate=np.float32(0.5), momentum=0, clip=None)
    _Example(clip=1.0)


def test_an_optional_annotation_checks_a_value_that_is_given():
    """Model fields such as ``dtype: Literal[...] | None`` are checked by ``check_type``."""
    choice = Literal["bfloat16", "float16"] | None
    check_type(None, choice, "dtype")
    check_type("float16", choice, "dtype")
    with pytest.raises(InvalidInputError, match=r"dtype must be one of \['bfloat16', 'float16'\]"):
        check_type("float8", choice, "dtype")
    with pytest.raises(InvalidInputError, match="width must be an integer"):
        check_type(2.5, int | None, "width")


def test_every_registered_defense_default_passes_its_checks():
    for name in DEFENSES:
        make_config(name)
    AnalysisConfig()


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: FIPConfig(steps=-3), "FIPConfig.steps must be >= 1"),
        (lambda: FIPConfig(log_every=0), "FIPConfig.log_every must be >= 1"),
        (lambda: FIPConfig(eta_F=float("inf")), "FIPConfig.eta_F must be finite"),
        (lambda: FIPConfig(trace_variant="fisher"), "FIPConfig.trace_variant must be one of"),
        (lambda: FTSAMConfig(momentum=1.5), "FTSAMConfig.momentum must be in"),
        (lambda: FTSAMConfig(rho=-1.0), "FTSAMConfig.rho must be >= 0"),
        (lambda: NFTConfig(mixup_alpha=0.0), "NFTConfig.mixup_alpha must be > 0"),
        (lambda: NFTConfig(floor_a=1.5), r"NFTConfig.floor_a must be in \[0, 1\]"),
        (lambda: NGFConfig(solver="lu"), "NGFConfig.solver must be one of"),
        (lambda: NGFConfig(refresh_every=0), "NGFConfig.refresh_every must be >= 1"),
        (lambda: AnalysisConfig(power_tol=0.0), "AnalysisConfig.power_tol must be > 0"),
    ],
)
def test_defense_configs_check_their_fields(build, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        build()


def test_command_line_overrides_get_the_same_checks():
    with pytest.raises(InvalidInputError, match="invalid fip config: FIPConfig.log_every"):
        make_config("fip", {"log_every": "0"})


def test_a_misspelt_option_that_differs_only_in_case_is_suggested_exactly():
    with pytest.raises(UnknownNameError, match="Did you mean 'eta_F'"):
        make_config("fip", {"eta_f": "1"})
