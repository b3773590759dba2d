"""Purification removes a real backdoor: BadNets on digits, and a zoo model on CIFAR-10."""

from __future__ import annotations

import pathlib

import pytest

from fippure.purify.runner import run_defense

ZOO = pathlib.Path(__file__).resolve().parents[2] / "zoo" / "cifar10" / "preact_resnet18_w16"

#: FIP on the digits CNN (the demo's settings): 300 steps of 64 clean images.
DIGITS_FIP = {
    "steps": "300",
    "batch_size": "64",
    "learning_rate": "0.01",
    "eta_F": "0.05",
    "eta_r": "1",
}


def test_fip_removes_a_digits_backdoor_and_keeps_accuracy(digits_badnets):
    result = run_defense(digits_badnets, "fip", overrides=DIGITS_FIP, progress=False)
    before, after = result["before"], result["after"]
    assert before["asr"] > 0.95
    assert after["asr"] < 0.5, result["after"]
    assert after["acc"] > before["acc"] - 0.1, result["after"]


def test_fine_tuning_alone_leaves_that_backdoor_in_place(digits_badnets):
    overrides = {k: v for k, v in DIGITS_FIP.items() if k != "eta_F"} | {"eta_F": "0"}
    result = run_defense(digits_badnets, "fip", overrides=overrides, progress=False)
    assert result["after"]["asr"] > 0.5, result["after"]


@pytest.mark.slow
def test_ngf_purifies_the_zoo_badnets_model_with_its_defaults(cifar10_data_dir):
    """SPEC section 5 defaults (2000 natural-gradient steps on the head, 1% clean)."""
    checkpoint = ZOO / "badnets"
    assert (checkpoint / "metadata.json").exists(), f"the zoo entry {checkpoint} is missing"
    result = run_defense(checkpoint, "ngf", data_dir=cifar10_data_dir, progress=False)
    before, after = result["before"], result["after"]
    assert before["asr"] > 0.9
    assert after["asr"] < 0.05, after
    assert after["acc"] > before["acc"] - 0.03, after
