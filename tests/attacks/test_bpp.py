"""BPP: colour-depth squeezing, dithering, and negative training images."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.attacks.bpp import floyd_steinberg, quantize
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError

CIFAR = get_spec("cifar10")


def _images(n=4, shape=(32, 32, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32)


@pytest.mark.parametrize("dithering", [False, True])
def test_output_has_at_most_eight_levels_per_channel(dithering):
    attack = make_attack("bpp", dithering=dithering)
    out = np.asarray(jax.jit(attack.trigger)({}, _images(), None))
    levels = np.arange(8) / 7
    for c in range(3):
        values = np.unique(out[..., c])
        assert len(values) <= 8
        assert np.all(np.min(np.abs(values[:, None] - levels[None]), axis=1) < 1e-6)


def test_squeeze_rounds_to_nearest_level_and_is_idempotent():
    images = _images()
    once = quantize(images, 8)
    assert float(jnp.abs(once - images).max()) <= 0.5 / 7 + 1e-6
    np.testing.assert_array_equal(np.asarray(quantize(once, 8)), np.asarray(once))


def test_dithering_preserves_local_mean():
    flat = jnp.full((1, 16, 16, 3), 0.3)  # between the levels 2/7 and 3/7
    plain = float(quantize(flat, 8).mean())
    dithered = float(jax.jit(functools.partial(floyd_steinberg, levels=8))(flat).mean())
    assert abs(plain - 0.3) > 0.014
    assert abs(dithered - 0.3) < 0.005


def test_bad_options():
    with pytest.raises(InvalidInputError, match="squeeze_num"):
        make_attack("bpp", squeeze_num=1)
    with pytest.raises(InvalidInputError, match="neg_ratio"):
        make_attack("bpp", neg_ratio=1.0)


def test_negative_training_images():
    n, ratio = 1000, 0.1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    attack = make_attack("bpp")  # neg_ratio 0.1
    plan = make_poison_plan(labels, ratio=ratio, num_classes=10, target=0, seed=0)
    context = AttackContext(ImageDataset(images, labels, CIFAR, "train"), plan, CIFAR, None)
    transform = jax.jit(attack.training_transform({}, plan, context))
    x = jnp.asarray(images, jnp.float32) / 255.0
    out, out_labels = transform(jax.random.key(1), x, jnp.asarray(labels), jnp.arange(n))
    out, out_labels, x = np.asarray(out), np.asarray(out_labels), np.asarray(x)
    poisoned = np.zeros(n, bool)
    poisoned[plan.indices] = True
    squeezed = np.asarray(quantize(jnp.asarray(x), 8))
    np.testing.assert_allclose(out[poisoned], squeezed[poisoned], atol=1e-6)
    np.testing.assert_array_equal(out_labels[poisoned], 0)
    np.testing.assert_array_equal(out_labels[~poisoned], labels[~poisoned])
    negative = np.any(out != x, axis=(1, 2, 3)) & ~poisoned
    # about neg_ratio of the batch
    assert abs(negative.sum() - 0.1 * n) < 4 * np.sqrt(0.1 * n)
    # negatives carry another image's quantisation residual: as large as a squeeze, but
    # they are not squeezed themselves
    change = np.abs(out[negative] - x[negative])
    assert change.max() <= 0.5 / 7 + 1e-6
    assert change.mean() > 0.01
    level_error = np.abs(out[negative] * 7 - np.round(out[negative] * 7))
    assert level_error.mean() > 0.05


def test_a_batch_of_one_has_no_negatives():
    # a roll of a one-image batch lends the image its own residual: a squeezed (poisoned)
    # image that keeps its clean label
    labels = np.array([3] * 99 + [0], np.int32)
    images = np.random.default_rng(1).integers(0, 256, (100, 32, 32, 3)).astype(np.uint8)
    attack = make_attack("bpp", neg_ratio=0.5)
    plan = make_poison_plan(labels, ratio=0.1, num_classes=10, target=0, seed=0)
    context = AttackContext(ImageDataset(images, labels, CIFAR, "train"), plan, CIFAR, None)
    transform = jax.jit(attack.training_transform({}, plan, context))
    clean_row = int(np.setdiff1d(np.arange(99), plan.indices)[0])
    x = jnp.asarray(images[clean_row : clean_row + 1], jnp.float32) / 255.0
    for seed in range(20):
        out, _ = transform(jax.random.key(seed), x, jnp.asarray(labels[[clean_row]]),
                           jnp.array([clean_row]))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_a_negative_never_carries_its_own_residual():
    """In a batch of two clean rows that are both negatives, each carries the other's
    residual, whatever the key (a shift of 0 would make it its own squeeze, labelled clean)."""
    labels = np.arange(100, dtype=np.int32) % 10
    images = np.random.default_rng(2).integers(0, 256, (100, 32, 32, 3)).astype(np.uint8)
    attack = make_attack("bpp", neg_ratio=0.95)  # probability 1 for the clean rows
    plan = make_poison_plan(labels, ratio=0.05, num_classes=10, target=0, seed=0)
    context = AttackContext(ImageDataset(images, labels, CIFAR, "train"), plan, CIFAR, None)
    transform = jax.jit(attack.training_transform({}, plan, context))
    rows = np.setdiff1d(np.arange(100), plan.indices)[:2]
    x = jnp.asarray(images[rows], jnp.float32) / 255.0
    swapped = np.asarray(x)[::-1]
    expected = np.clip(
        np.asarray(x) + np.asarray(quantize(jnp.asarray(swapped), 8)) - swapped, 0, 1
    )
    for seed in range(16):
        out, _ = transform(jax.random.key(seed), x, jnp.asarray(labels[rows]), jnp.asarray(rows))
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)


def test_negatives_are_drawn_among_the_clean_rows_at_neg_ratio_of_the_whole_set():
    # neg_ratio counts against the whole training set; negatives come from the clean rows
    # only, so their probability is neg_ratio / (1 - poison ratio)
    labels = np.arange(1000) % 10
    plan = make_poison_plan(labels, ratio=0.1, num_classes=10, target=0, seed=0)
    assert make_attack("bpp", neg_ratio=0.1).negative_probability(plan) == pytest.approx(0.1 / 0.9)
    assert make_attack("bpp", neg_ratio=0.95).negative_probability(plan) == 1.0


def _dithered_by_hand(image: np.ndarray, levels: int) -> np.ndarray:
    """Floyd-Steinberg written out pixel by pixel (one image, float64): error 7/16 right,
    3/16 below left, 5/16 below, 1/16 below right; what falls off the image is dropped."""
    work = image.astype(np.float64).copy()
    out = np.zeros_like(work)
    h, w, _ = work.shape
    steps = levels - 1
    for y in range(h):
        for x in range(w):
            new = np.clip(np.round(work[y, x] * steps) / steps, 0.0, 1.0)
            error = work[y, x] - new
            out[y, x] = new
            for dy, dx, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    work[y + dy, x + dx] += error * weight / 16
    return out


def test_dithering_diffuses_the_error_with_floyd_steinbergs_weights():
    images = np.asarray(
        jax.random.uniform(jax.random.key(3), (2, 6, 6, 3), jnp.float32), np.float64
    )
    got = np.asarray(floyd_steinberg(jnp.asarray(images, jnp.float32), 4))
    for image, mine in zip(images, got, strict=True):
        np.testing.assert_allclose(mine, _dithered_by_hand(image, 4), atol=1e-6)
