"""Pixel-space triggers: BadNets, Blend, Trojan and SIG change exactly what they should."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan, triggered_test_set
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError

CIFAR = get_spec("cifar10")


def _images(n=4, shape=(32, 32, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32, 0.1, 0.9)


def _changed(a, b):
    """Pixels (h, w) where any channel of any image differs (beyond float rounding)."""
    return np.any(np.abs(np.asarray(a) - np.asarray(b)) > 1e-6, axis=(0, 3))


def test_badnets_changes_only_the_bottom_right_3x3_corner():
    images = _images()
    out = make_attack("badnets").trigger({}, images, None)
    expected = np.zeros((32, 32), bool)
    expected[-3:, -3:] = True
    np.testing.assert_array_equal(_changed(out, images), expected)
    np.testing.assert_array_equal(np.asarray(out[:, -3:, -3:]), 1.0)


def test_badnets_patch_takes_its_value():
    out = make_attack("badnets", value=0.25).trigger({}, jnp.zeros((2, 32, 32, 3)), None)
    np.testing.assert_array_equal(np.asarray(out[:, -3:, -3:]), 0.25)
    assert float(jnp.abs(out[:, :-3]).max()) == 0.0


def test_blend_is_exact_convex_combination():
    attack = make_attack("blend", alpha=0.2)
    state = attack.init_state(jax.random.key(5), CIFAR)
    images = _images()
    out = attack.trigger(state, images, None)
    np.testing.assert_allclose(
        np.asarray(out), 0.8 * np.asarray(images) + 0.2 * np.asarray(state["pattern"]), atol=1e-6
    )


@pytest.mark.parametrize(
    ("corner", "rows", "cols"),
    [
        ("bottom_right", slice(26, 31), slice(26, 31)),
        ("bottom_left", slice(26, 31), slice(1, 6)),
        ("top_right", slice(1, 6), slice(26, 31)),
        ("top_left", slice(1, 6), slice(1, 6)),
    ],
)
def test_trojan_changes_only_its_patch(corner, rows, cols):
    attack = make_attack("trojan", corner=corner)  # 5x5, 1 pixel from the border
    state = attack.init_state(jax.random.key(0), CIFAR)
    images = _images()
    out = attack.trigger(state, images, None)
    expected = np.zeros((32, 32), bool)
    expected[rows, cols] = True
    np.testing.assert_array_equal(_changed(out, images), expected)
    patch = np.asarray(out[:, rows, cols])
    np.testing.assert_array_equal(patch, np.broadcast_to(state["pattern"], patch.shape))


def test_trojan_pattern_is_a_seeded_black_and_white_square():
    attack = make_attack("trojan")
    a = np.asarray(attack.init_state(jax.random.key(0), CIFAR)["pattern"])
    b = np.asarray(attack.init_state(jax.random.key(1), CIFAR)["pattern"])
    assert a.shape == (5, 5, 3)
    assert set(np.unique(a)) == {0.0, 1.0}
    assert not np.array_equal(a, b)


def test_trojan_alpha_blends_the_patch():
    attack = make_attack("trojan", alpha=0.5, margin=0)
    state = attack.init_state(jax.random.key(0), CIFAR)
    images = _images()
    out = attack.trigger(state, images, None)
    np.testing.assert_allclose(
        np.asarray(out[:, -5:, -5:]),
        0.5 * np.asarray(images[:, -5:, -5:]) + 0.5 * np.asarray(state["pattern"]),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 0}, "Trojan.size must be >= 1, got 0"),
        ({"corner": "middle"}, r"Trojan.corner must be one of \['bottom_right', .*got 'middle'"),
        ({"alpha": 0.0}, r"Trojan.alpha must be in \(0, 1\], got 0.0"),
    ],
)
def test_trojan_bad_options(options, message):
    with pytest.raises(InvalidInputError, match=message):
        make_attack("trojan", **options)


def test_trojan_too_large_for_the_image():
    with pytest.raises(InvalidInputError, match="does not fit 8x8"):
        make_attack("trojan", size=8).init_state(jax.random.key(0), get_spec("digits"))


def test_badnets_patch_must_leave_part_of_the_image():
    with pytest.raises(InvalidInputError, match="would cover the whole 8x8 image; use size < 8"):
        make_attack("badnets", size=8).init_state(jax.random.key(0), get_spec("digits"))
    assert make_attack("badnets", size=7).init_state(jax.random.key(0), get_spec("digits")) == {}


def test_sig_signal_has_amplitude_delta_before_clipping():
    attack = make_attack("sig")
    assert attack.clean_label
    signal = np.asarray(attack.signal(32))
    assert np.abs(signal).max() == pytest.approx(40 / 255, rel=1e-6)
    np.testing.assert_allclose(
        signal, 40 / 255 * np.sin(2 * np.pi * 6 * np.arange(32) / 32), atol=1e-6
    )
    grey = jnp.full((1, 32, 32, 3), 0.5)
    out = np.asarray(attack.trigger({}, grey, None))
    # every row and channel carries the same signal
    np.testing.assert_allclose(
        out - 0.5, np.broadcast_to(signal[None, None, :, None], out.shape), atol=1e-6
    )
    # clipping keeps the result in [0, 1]
    white = attack.trigger({}, jnp.ones((1, 32, 32, 3)), None)
    assert float(white.max()) == 1.0 and float(white.min()) == pytest.approx(1 - 40 / 255)


def test_sig_poisons_only_target_class_training_images():
    n, target = 200, 3
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(30, 220, (n, 32, 32, 3)).astype(np.uint8)
    attack = make_attack("sig")
    plan = make_poison_plan(
        labels, ratio=0.05, num_classes=10, target=target, clean_label=attack.clean_label
    )
    data = ImageDataset(images, labels, CIFAR, "train")
    context = AttackContext(data, plan, CIFAR, jax.random.key(0))
    transform = attack.training_transform({}, plan, context)
    x = jnp.asarray(images, jnp.float32) / 255.0
    out, out_labels = transform(jax.random.key(1), x, jnp.asarray(labels), jnp.arange(n))
    changed = np.flatnonzero(np.any(np.asarray(out) != np.asarray(x), axis=(1, 2, 3)))
    np.testing.assert_array_equal(changed, plan.indices)
    assert np.all(labels[changed] == target)
    np.testing.assert_array_equal(np.asarray(out_labels), labels)  # labels are kept
    np.testing.assert_allclose(
        np.asarray(out[changed]), np.asarray(attack.trigger({}, x[changed], None)), atol=1e-6
    )


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_trojan_triggered_test_set(mode):
    rng = np.random.default_rng(0)
    labels = np.arange(30, dtype=np.int32) % 10
    images = rng.integers(0, 256, (30, 32, 32, 3)).astype(np.uint8)
    test = ImageDataset(images, labels, CIFAR, "test")
    attack = make_attack("trojan")
    state = attack.init_state(jax.random.key(0), CIFAR)
    target = 2 if mode == "all_to_one" else 0  # all-to-all has no single target
    triggered = triggered_test_set(attack, state, test, target=target, mode=mode)
    if mode == "all_to_one":  # target-class images are left out
        np.testing.assert_array_equal(triggered.source_indices, np.flatnonzero(labels != 2))
        np.testing.assert_array_equal(triggered.target_labels, 2)
    else:  # every image, each to the next class
        np.testing.assert_array_equal(triggered.source_indices, np.arange(30))
        np.testing.assert_array_equal(triggered.target_labels, (labels + 1) % 10)
    np.testing.assert_array_equal(triggered.true_labels, labels[triggered.source_indices])
    clean = images[triggered.source_indices].astype(np.float32) / 255.0
    expected = np.zeros((32, 32), bool)
    expected[26:31, 26:31] = True
    np.testing.assert_array_equal(_changed(triggered.images, clean), expected)


def test_a_triggered_set_restricted_to_part_of_the_test_split():
    labels = np.arange(30, dtype=np.int32) % 10
    images = np.zeros((30, 32, 32, 3), np.uint8)
    test = ImageDataset(images, labels, CIFAR, "test")
    attack = make_attack("badnets")
    triggered = triggered_test_set(attack, {}, test, target=0, mode="all_to_one")
    part = triggered.of_test_images(np.arange(12))
    np.testing.assert_array_equal(part.source_indices, [1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    np.testing.assert_array_equal(part.true_labels, labels[part.source_indices])
    np.testing.assert_array_equal(part.target_labels, 0)
    np.testing.assert_array_equal(part.images, triggered.images[:10])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 0, "mode": "all2one"}, "unknown attack mode 'all2one'"),
        ({"target": 10, "mode": "all_to_one"}, "target 10 is out of range"),
        ({"target": -1, "mode": "all_to_one"}, "target -1 is out of range"),
        ({"target": 0, "mode": "all_to_one", "seed": None}, "seed must be an integer"),
    ],
)
def test_a_triggered_set_refuses_an_unknown_mode_target_or_seed(kwargs, message):
    # "all2one" once kept the target-class images, so the ASR counted them
    labels = np.arange(20, dtype=np.int32) % 10
    test = ImageDataset(np.zeros((20, 32, 32, 3), np.uint8), labels, CIFAR, "test")
    with pytest.raises(InvalidInputError, match=message):
        triggered_test_set(make_attack("badnets"), {}, test, **kwargs)
