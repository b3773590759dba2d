"""Label-consistent attack: PGD within eps on target-class images only, four-corner trigger."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.attacks.clb import corner_pattern
from fippure.data.pipeline import to_unit_range
from fippure.data.sources import load_dataset
from fippure.errors import InvalidInputError
from fippure.inference import predict, predict_logits
from fippure.losses import cross_entropy
from fippure.recipes import train_backdoored
from fippure.training import TrainConfig
from fippure.zoo import load_backdoored

EPS = 8 / 255


@pytest.mark.parametrize("size", [2, 3])
def test_trigger_changes_exactly_the_four_corners(size):
    attack = make_attack("clb", size=size)
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=0.2, maxval=0.8)
    out = np.asarray(jax.jit(attack.trigger)({}, images, None))
    changed = np.any(out != np.asarray(images), axis=(0, 3))
    expected = np.zeros((32, 32), bool)
    for rows in (slice(0, size), slice(32 - size, 32)):
        for cols in (slice(0, size), slice(32 - size, 32)):
            expected[rows, cols] = True
    np.testing.assert_array_equal(changed, expected)
    assert set(np.unique(out[:, expected])) <= {0.0, 1.0}  # amplitude 1 stamps black/white
    # Mirrored corners: the trigger is symmetric about both axes.
    _, pattern = corner_pattern((32, 32, 3), size)
    np.testing.assert_array_equal(pattern, pattern[::-1])
    np.testing.assert_array_equal(pattern, pattern[:, ::-1])


def test_reduced_amplitude_blends():
    attack = make_attack("clb", amplitude=0.25)
    images = jnp.full((1, 8, 8, 1), 0.5)
    out = np.asarray(attack.trigger({}, images, None))
    mask, pattern = corner_pattern((8, 8, 1), 3)
    np.testing.assert_allclose(out[0], 0.5 + 0.25 * mask * (pattern - 0.5), atol=1e-7)
    with pytest.raises(InvalidInputError):
        corner_pattern((4, 4, 1), 3)


@pytest.fixture(scope="module")
def fitted(digits_reference):
    data = load_dataset("digits", "train")
    attack = make_attack("clb", size=2)
    plan = make_poison_plan(
        data.labels, ratio=0.05, num_classes=10, target=0, clean_label=True, seed=0
    )
    context = AttackContext(
        data,
        plan,
        data.spec,
        jax.random.key(0),
        reference=(digits_reference.model, digits_reference.variables),
        progress=False,
    )
    state = attack.fit(attack.init_state(jax.random.key(1), data.spec), context)
    return attack, context, state


def test_pgd_stays_in_the_eps_ball_and_raises_the_reference_loss(fitted, digits_reference):
    attack, context, state = fitted
    plan, data = context.plan, context.train
    adversarial = state["adversarial_images"]
    assert adversarial.dtype == np.uint8 and adversarial.shape == (len(plan.indices), 8, 8, 1)
    delta = adversarial.astype(int) - data.images[plan.indices].astype(int)
    assert np.abs(delta).max() == 8  # 8 grey levels = eps, reached
    labels = data.labels[plan.indices]
    before = _reference_loss(digits_reference, data.images[plan.indices], labels, data.spec)
    after = _reference_loss(digits_reference, adversarial, labels, data.spec)
    assert after > 3 * before  # the images got much harder for the reference model


def _reference_loss(reference, images, labels, spec) -> float:
    logits = predict_logits(reference.model, reference.variables, images, spec)
    return float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))


def test_only_target_images_are_poisoned_and_labels_kept(fitted):
    attack, context, state = fitted
    plan, data = context.plan, context.train
    assert np.all(data.labels[plan.indices] == 0)
    np.testing.assert_array_equal(plan.labels, data.labels[plan.indices])
    poisoned = attack.poisoned_dataset(state, context)
    np.testing.assert_array_equal(poisoned.labels, data.labels)
    differs = np.flatnonzero(np.any(poisoned.images != data.images, axis=(1, 2, 3)))
    assert set(differs) <= set(plan.indices) and len(differs) > 0.9 * len(plan.indices)


def test_each_adversarial_image_replaces_its_own_planned_row(fitted):
    # the adversarial images are stored in plan order: written back reversed, every row
    # would still change, but into another image
    attack, context, state = fitted
    poisoned = attack.poisoned_dataset(state, context)
    rows = context.plan.indices
    np.testing.assert_array_equal(poisoned.images[rows], state["adversarial_images"])
    change = poisoned.images[rows].astype(int) - context.train.images[rows].astype(int)
    assert np.abs(change).max() <= 8


def test_quantised_images_stay_within_the_whole_grey_levels_of_eps():
    # eps 0.03 is 7.65 grey levels: the rounded images move by 7 at most, never 8
    attack = make_attack("clb", eps=0.03)
    images = np.full((2, 8, 8, 1), 100, np.uint8)
    out = attack._quantise(images, images / 255.0 + 0.03)
    assert np.abs(out.astype(int) - 100).max() == 7


def test_training_images_are_test_triggers_plus_at_most_eps(fitted):
    """Outside the corners a poisoned training image is its triggered test image + <= eps;
    inside them (amplitude 1) both are the pattern."""
    attack, context, state = fitted
    rows = context.plan.indices
    train_time = attack.poison({}, to_unit_range(state["adversarial_images"]), None)
    test_time = attack.trigger({}, to_unit_range(context.train.images[rows]), None)
    gap = np.abs(np.asarray(train_time) - np.asarray(test_time))
    mask, _ = corner_pattern((8, 8, 1), 2)
    assert gap[:, mask[..., 0] > 0].max() == 0.0
    assert gap.max() <= EPS + 1e-6


def test_a_short_last_pgd_batch_gives_the_same_images(fitted):
    """The last batch is padded to the compiled shape; each image's PGD is its own."""
    attack, context, state = fitted
    count = len(context.plan.indices)
    ragged = dataclasses.replace(attack, pgd_batch_size=max(1, count // 2 + 1))
    again = ragged.fit(ragged.init_state(jax.random.key(1), context.spec), context)
    np.testing.assert_array_equal(again["adversarial_images"], state["adversarial_images"])


def test_the_saved_state_is_empty(fitted):
    attack, _, state = fitted
    assert "adversarial_images" in state
    assert attack.saved_state(state) == {}


def test_fit_needs_a_reference(fitted):
    attack, context, _ = fitted
    import dataclasses

    with pytest.raises(InvalidInputError, match="reference"):
        attack.fit({}, dataclasses.replace(context, reference=None))


def test_digits_backdoor_is_learnt(tmp_path, digits_reference):
    """Every target-class image poisoned (the clean-label maximum), 2x2 corners on 8x8.

    The small digits network is robust to 8/255: a 32/255 ball makes them hard enough."""
    config = TrainConfig(
        epochs=10, batch_size=64, learning_rate=0.1, eval_every=100, checkpoint_every=10**6
    )
    report = train_backdoored(
        dataset="digits",
        model="small_cnn",
        model_kwargs={"width": 16},
        out=tmp_path / "clb",
        config=config,
        attack="clb",
        attack_options={"size": 2, "eps": 32 / 255, "step_size": 4 / 255},
        ratio=0.1,
        reference=digits_reference.path,
        progress=False,
    )
    assert report["attack"]["clean_label"]
    assert report["asr"] >= 0.8, report
    assert report["test_accuracy"] >= 0.9, report
    # The checkpoint keeps no adversarial images, and reloads to the same ASR.
    assert not (tmp_path / "clb" / "extras").exists()
    loaded = load_backdoored(tmp_path / "clb")
    predictions = predict(loaded.model, loaded.variables, loaded.triggered.images, loaded.spec)
    assert np.mean(predictions == 0) == pytest.approx(report["asr"])
