"""A small backdoored model shared by the defense tests: BadNets on the embedded digits."""

from __future__ import annotations

import pytest

from fippure.recipes import train_backdoored
from fippure.training import TrainConfig
from fippure.zoo import load_backdoored


@pytest.fixture(scope="session")
def digits_badnets_path(directory_built_once_per_run):
    """Checkpoint of a small CNN backdoored with BadNets on digits (144 clean images)."""

    def build(out):
        report = train_backdoored(
            dataset="digits",
            model="small_cnn",
            out=out,
            config=TrainConfig(epochs=12, batch_size=64, learning_rate=0.05, eval_every=12),
            attack="badnets",
            ratio=0.1,
            clean_size=0.1,
            progress=False,
        )
        assert report["asr"] > 0.95 and report["test_accuracy"] > 0.9, report

    return directory_built_once_per_run("digits_badnets", build)


@pytest.fixture(scope="session")
def digits_badnets(digits_badnets_path):
    """The loaded :class:`fippure.zoo.BackdooredModel`."""
    return load_backdoored(digits_badnets_path)


@pytest.fixture(scope="session")
def digits_scan(digits_badnets, full_optimization, built_once_per_run):
    """Neural Cleanse over the ten digit classes, on the clean set less its validation slice of
    4 images per class (the part :func:`purify_with_clean_stop` trains on)."""
    import jax

    from fippure.data.splits import hold_out_per_class
    from fippure.purify.trigger_inversion import InversionConfig, scan_classes

    b = digits_badnets
    fit, _ = hold_out_per_class(b.clean.labels, 4)

    def build():
        with full_optimization():
            return scan_classes(
                b.model,
                b.variables,
                b.clean.subset(fit),
                InversionConfig(steps=150),
                jax.random.key(0),
            )

    return built_once_per_run("digits_scan", build)
