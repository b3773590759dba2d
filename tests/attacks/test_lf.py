"""LF: the universal pattern is bounded, low-frequency, and fools the clean reference model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import fft

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.attacks.lf import bspline_matrix
from fippure.data import normalize, to_unit_range
from fippure.data.catalog import get_spec
from fippure.data.sources import load_dataset
from fippure.errors import InvalidInputError
from fippure.inference import predict_logits


def _low_frequency_share(pattern: np.ndarray, fraction: float = 0.25) -> float:
    """Share of the pattern's energy in DCT frequencies below ``fraction`` of each axis."""
    energy = fft.dctn(np.asarray(pattern, np.float64), axes=(0, 1), norm="ortho") ** 2
    h, w = pattern.shape[:2]
    return float(energy[: int(h * fraction), : int(w * fraction)].sum() / energy.sum())


def _target_log_probability(reference, images, spec, target: int = 0) -> float:
    logits = predict_logits(*reference, images, spec)
    return float(np.mean(jax.nn.log_softmax(logits)[:, target]))


def test_bspline_matrix_is_a_convex_smoother():
    matrix = bspline_matrix(8, 32)
    assert matrix.min() >= 0.0
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(bspline_matrix(1, 5), np.ones((5, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_pattern_is_bounded_and_low_frequency(seed):
    attack = make_attack("lf", eps=0.05)
    coarse = jax.random.uniform(jax.random.key(seed), (8, 8, 3), minval=-1.0) * attack.eps
    pattern = np.asarray(attack.expand(coarse, 32, 32))
    assert np.abs(pattern).max() <= attack.eps + 1e-7
    # >= 95% of the energy in the lowest quarter of frequencies (white noise: about 6%)
    assert _low_frequency_share(pattern) > 0.95
    noise = np.random.default_rng(seed).uniform(-1, 1, (32, 32, 3))
    assert _low_frequency_share(noise) < 0.15


def test_fit_needs_a_reference():
    data = load_dataset("digits", "train")
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10)
    attack = make_attack("lf")
    context = AttackContext(data, plan, data.spec, jax.random.key(0))
    with pytest.raises(InvalidInputError, match="reference"):
        attack.fit(attack.init_state(jax.random.key(0), data.spec), context)


def test_fit_is_computed_on_non_target_images_only(digits_reference):
    """LF fools the reference into the target class on images of the other classes; a set of
    target-class images alone leaves it nothing to fit on."""
    from fippure.attacks.poisoning import PoisonPlan

    data = load_dataset("digits", "train")
    zeros = data.subset(np.flatnonzero(data.labels == 0)[:10], "zeros")
    plan = PoisonPlan(np.array([0]), np.array([0]), 10, 0, "all_to_one", False, 1)
    reference = (digits_reference.model, digits_reference.variables)
    context = AttackContext(zeros, plan, data.spec, jax.random.key(0), reference=reference)
    attack = make_attack("lf")
    with pytest.raises(InvalidInputError, match="no training image outside the target class"):
        attack.fit(attack.init_state(jax.random.key(0), data.spec), context)


_SHOWN: list = []


class _RecordingReference(nn.Module):
    """A linear classifier that records the images it is shown in ``_SHOWN``."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        jax.debug.callback(lambda v: _SHOWN.append(np.asarray(v)), x)
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_fit_shows_the_reference_normalised_images():
    """The reference model is fitted against as it is applied: to normalised images (a fit on
    [0, 1] images fooled a model that never sees such inputs)."""
    data = load_dataset("digits", "train")
    data = data.subset(np.flatnonzero(data.labels != 0)[:20], "few")
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10, target=0)
    model = _RecordingReference()
    variables = model.init(jax.random.key(0), jnp.zeros((1, *data.spec.image_shape)))
    _SHOWN.clear()
    context = AttackContext(data, plan, data.spec, jax.random.key(0), (model, variables))
    attack = make_attack("lf", steps=1, batch_size=4)
    attack.fit(attack.init_state(jax.random.key(0), data.spec), context)
    shown = np.concatenate(_SHOWN)  # step 0: the pattern is still zero
    candidates = np.asarray(normalize(to_unit_range(jnp.asarray(data.images)), data.spec))
    assert len(shown) == 4
    for image in shown:
        assert np.abs(candidates - image).max(axis=(1, 2, 3)).min() < 1e-5


def test_fit_fools_the_reference_within_the_bound(digits_reference):
    data = load_dataset("digits", "train")
    spec = get_spec("digits")
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10, target=0)
    attack = make_attack("lf", eps=0.2, factor=2, steps=150)
    reference = (digits_reference.model, digits_reference.variables)
    context = AttackContext(data, plan, spec, jax.random.key(0), reference, progress=False)
    state = attack.fit(attack.init_state(jax.random.key(0), spec), context)
    pattern = np.asarray(state["pattern"])
    assert pattern.shape == (8, 8, 1)
    assert np.abs(pattern).max() <= 0.2 + 1e-6
    assert np.abs(pattern).max() > 0.1  # it uses its budget
    images = data.images[data.labels != 0]
    clean = _target_log_probability(reference, images, spec)
    triggered = attack.trigger(state, jnp.asarray(images, jnp.float32) / 255.0, None)
    fooled = _target_log_probability(reference, np.asarray(triggered), spec)
    assert fooled > clean + 1.0  # the target is e times likelier on average, or more
    # a random pattern of the same size and smoothness does much less
    coarse = jax.random.uniform(jax.random.key(1), attack.coarse_shape((8, 8, 1)), minval=-1)
    random_state = {"pattern": attack.expand(attack.eps * coarse, 8, 8)}
    random = attack.trigger(random_state, jnp.asarray(images, jnp.float32) / 255.0, None)
    assert _target_log_probability(reference, np.asarray(random), spec) < fooled - 0.5
    # the same key gives the same pattern
    again = attack.fit(attack.init_state(jax.random.key(0), spec), context)
    np.testing.assert_array_equal(np.asarray(again["pattern"]), pattern)
