"""Poisoned training end to end: the backdoor is learnt, the clean accuracy stays.

The digits tests run ``fippure.recipes.train_backdoored`` (what ``fippure attack`` runs) for
every attack with a closed-form trigger. The digits are 8x8 grey images, so some triggers get
digits-sized settings: the CIFAR-10 defaults (a 40/255 sinusoid, a warp of half a pixel,
8 colour levels on images that have 17, a 30/255 DCT coefficient) are too faint to be learnt
in a few epochs on them. The defaults themselves are exercised on CIFAR-10 by the attack zoo.
"""

from __future__ import annotations

import jax
import pytest

from fippure.attacks import make_attack
from fippure.recipes import train_backdoored
from fippure.training import TrainConfig

DIGITS_SETTINGS = {
    "trojan": {"size": 3},
    "sig": {"delta": 0.7, "frequency": 3},  # clean-label: every target-class image poisoned
    "wanet": {"s": 3.0, "cross_ratio": 0.5},
    "bpp": {"squeeze_num": 2},
    "ftrojan": {"magnitude": 1.0},
    "lf": {"eps": 0.2, "factor": 2},
}


@pytest.fixture
def fast_compilation():
    """Compilation dominates these small runs; XLA's optimisations cost more than they save."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.mark.parametrize("name", sorted(DIGITS_SETTINGS))
def test_digits_backdoor_is_learnt(name, tmp_path, digits_reference, fast_compilation):
    config = TrainConfig(
        epochs=10, batch_size=64, learning_rate=0.1, eval_every=100, checkpoint_every=10**6
    )
    attack = make_attack(name)
    report = train_backdoored(
        dataset="digits",
        model="small_cnn",
        model_kwargs={"width": 16},
        out=tmp_path / name,
        config=config,
        attack=name,
        attack_options=DIGITS_SETTINGS[name],
        ratio=0.1,
        target=0,
        reference=digits_reference.path if attack.needs_reference else None,
        progress=False,
    )
    assert report["asr"] >= 0.8, report
    assert report["test_accuracy"] >= 0.9, report
    assert report["attack"]["clean_label"] == attack.clean_label
    assert (tmp_path / name / "metadata.json").exists()
