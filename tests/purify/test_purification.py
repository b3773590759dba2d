"""Purification removes a real backdoor: BadNets on digits, and a zoo model on CIFAR-10."""

from __future__ import annotations

import pathlib
import statistics
from typing import NamedTuple

import jax
import numpy as np
import pytest

from fippure.attacks.triggered import TriggeredSet
from fippure.data.sources import ImageDataset
from fippure.evaluation.metrics import BackdoorMetrics, evaluate_backdoor
from fippure.purify.registry import get_defense, make_config
from fippure.purify.runner import run_defense
from fippure.zoo import BackdooredModel, load_backdoored

ZOO = pathlib.Path(__file__).resolve().parents[2] / "zoo" / "cifar10" / "preact_resnet18_w16"

#: FIP on the digits CNN with SPEC's eval-mode trace and recomputed statistics: 300 steps of 64
#: clean images, a weaker trace penalty than the demo's and no gradient clipping (the demo runs
#: 150 steps at lr 0.02 with eta_F 3, the trace in BN train mode and transferred statistics).
DIGITS_FIP = {
    "steps": "300",
    "batch_size": "64",
    "learning_rate": "0.01",
    "eta_F": "0.05",
    "eta_r": "1",
}


def test_fip_removes_a_digits_backdoor_and_keeps_accuracy(digits_badnets):
    """Judged on the median over three defense seeds: on 144 clean images one seed's result
    moves with float rounding (one machine gave seed 0 ACC 0.79, others 0.96-0.99).

    The rounding also depends on the XLA optimisation level the steps were compiled at, and
    JAX's in-memory cache of compiled functions does not key on it: an equal FIP step that an
    earlier test compiled under full optimisation (``test_clean_stop.py``) would be reused
    here, and it gave seeds 0-2 ACC 0.45 / 0.84 / 0.96. So the steps are compiled afresh, at
    the suite's level."""
    jax.clear_caches()
    results = [
        run_defense(digits_badnets, "fip", overrides=DIGITS_FIP, seed=seed, progress=False)
        for seed in range(3)
    ]
    before = results[0]["before"]
    afters = [r["after"] for r in results]
    assert before["asr"] > 0.95
    assert statistics.median(a["asr"] for a in afters) < 0.5, afters
    assert statistics.median(a["acc"] for a in afters) > before["acc"] - 0.1, afters


def test_fine_tuning_alone_leaves_that_backdoor_in_place(digits_badnets):
    overrides = {k: v for k, v in DIGITS_FIP.items() if k != "eta_F"} | {"eta_F": "0"}
    result = run_defense(digits_badnets, "fip", overrides=overrides, progress=False)
    assert result["after"]["asr"] > 0.5, result["after"]


class ZooBadNets(NamedTuple):
    """The zoo's BadNets model, the first 3,000 test images, their triggered copies, and the
    model's metrics on them before any defense."""

    backdoored: BackdooredModel
    test: ImageDataset
    triggered: TriggeredSet
    before: BackdoorMetrics


@pytest.fixture(scope="module")
def zoo_badnets(cifar10_data_dir, full_optimization) -> ZooBadNets:
    """Loaded and judged once for the module's defenses (the whole test split is the
    benchmark's, ``purify_cifar10_w16.md``)."""
    backdoored = load_backdoored(ZOO / "badnets", data_dir=cifar10_data_dir)
    judged = np.arange(3000)
    test = backdoored.test.subset(judged)
    triggered = backdoored.triggered.of_test_images(judged)
    with full_optimization():
        before = evaluate_backdoor(backdoored.model, backdoored.variables, test, triggered)
    return ZooBadNets(backdoored, test, triggered, before)


def purify_zoo_badnets(defense: str, overrides: dict[str, str], zoo: ZooBadNets):
    """Runs ``defense`` on the zoo's BadNets model and its 500 clean images; returns the report
    and the metrics after, on the fixture's test images and their triggered copies."""
    b = zoo.backdoored
    variables, report = get_defense(defense).purify(
        b.model, b.variables, b.clean, make_config(defense, overrides), jax.random.key(0),
        progress=False,
    )  # fmt: skip
    return report, evaluate_backdoor(b.model, variables, zoo.test, zoo.triggered)


@pytest.mark.slow
def test_ngf_purifies_the_zoo_badnets_model_with_its_defaults(zoo_badnets, optimized_compilation):
    """SPEC section 5 defaults (2000 natural-gradient steps on the head, 1% clean); on the whole
    test split the benchmark measured 0.854 / 0.000."""
    report, after = purify_zoo_badnets("ngf", {}, zoo_badnets)
    before = zoo_badnets.before
    assert report.steps == 2000
    assert before.asr > 0.9, before
    assert after.asr < 0.05, after
    assert after.acc > before.acc - 0.03, after


@pytest.mark.slow
def test_nft_removes_the_zoo_badnets_backdoor_on_a_reduced_budget(
    zoo_badnets, optimized_compilation
):
    """NFT (SPEC section 4) with 80 of its 1000 steps, the original BatchNorm statistics moved
    by the change measured on D_v (``final_batch_stats="transfer"``).

    Measured on the first 3,000 test images and their triggered copies, where this test judges
    it: ACC / ASR 0.874 / 0.962 -> 0.873 / 0.058 (60 steps gave 0.875 / 0.204, 100 steps
    0.873 / 0.041, 150 steps 0.866 / 0.039; 300 steps with recomputed statistics gave
    0.852 / 0.426; the whole test split is in ``experiments/results/purify_cifar10_w16.md``).
    """
    report, after = purify_zoo_badnets(
        "nft", {"steps": "80", "final_batch_stats": "transfer"}, zoo_badnets
    )
    before = zoo_badnets.before
    assert report.steps == 80 and report.tunable_parameters < 1000  # BN-channel masks only
    assert before.asr > 0.9, before
    assert after.asr < 0.2, after
    assert after.acc > before.acc - 0.03, after
