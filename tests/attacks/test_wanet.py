"""WaNet and the pure-JAX warping helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.attacks.warping import bicubic_matrix, grid_sample, identity_grid
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset

CIFAR = get_spec("cifar10")
sample = jax.jit(grid_sample)


def _images(n=3, shape=(32, 32, 3), seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32)


def test_grid_sample_identity_and_against_scipy():
    images = _images(2, (7, 9, 2))
    np.testing.assert_allclose(
        np.asarray(sample(images, identity_grid(7, 9)[None])), np.asarray(images), atol=1e-6
    )
    # random in-bounds grid, one per image, against scipy's order-1 interpolation
    grid = jax.random.uniform(jax.random.key(1), (2, 5, 6, 2), minval=-1.0, maxval=1.0)
    out = np.asarray(sample(images, grid))
    for b in range(2):
        rows = (np.asarray(grid[b, ..., 1]) + 1) * (7 - 1) / 2
        cols = (np.asarray(grid[b, ..., 0]) + 1) * (9 - 1) / 2
        for c in range(2):
            expected = ndimage.map_coordinates(
                np.asarray(images[b, :, :, c], np.float64), [rows, cols], order=1
            )
            np.testing.assert_allclose(out[b, :, :, c], expected, atol=1e-5)


def test_grid_sample_reads_zeros_outside():
    images = jnp.ones((1, 4, 4, 1))
    grid = jnp.asarray([[[[3.0, 0.0], [-1.0 - 2.0 / 3.0 * 0.5, 0.0]]]])  # far out, half a pixel out
    out = np.asarray(sample(images, grid))[0, 0, :, 0]
    np.testing.assert_allclose(out, [0.0, 0.5], atol=1e-6)


def test_bicubic_matrix_is_an_interpolation():
    np.testing.assert_allclose(bicubic_matrix(6, 6), np.eye(6), atol=1e-12)
    matrix = bicubic_matrix(4, 32)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    # the corners are aligned: the first and last outputs are the first and last inputs
    np.testing.assert_allclose(matrix[[0, -1]], np.eye(4)[[0, -1]], atol=1e-12)
    # symmetric: upsampling a mirrored field gives the mirrored result
    np.testing.assert_allclose(matrix[::-1, ::-1], matrix, atol=1e-12)
    # Keys' kernel (a = -0.75) overshoots a step a little, as PyTorch's bicubic mode does
    step = matrix @ np.array([0.0, 0.0, 1.0, 1.0])
    assert -0.15 < step.min() < 0.0 and 1.0 < step.max() < 1.15


def test_noise_field_is_normalised_and_seeded():
    attack = make_attack("wanet")
    state = attack.init_state(jax.random.key(0), CIFAR)
    noise = np.asarray(state["noise_grid"])
    assert noise.shape == (32, 32, 2)
    # the 4x4 control values (normalised to mean |.| = 1) sit on the corners of the upsampled
    # field; bicubic interpolation overshoots them only a little
    assert 1.0 < np.abs(noise).max() < 4.0 * 1.3
    other = np.asarray(attack.init_state(jax.random.key(1), CIFAR)["noise_grid"])
    assert not np.allclose(noise, other)


def test_noise_field_is_uniform_control_values_scaled_to_mean_magnitude_one():
    """WaNet's field: k x k x 2 uniform values in [-1, 1] divided by their mean magnitude, then
    upsampled with the corners aligned (so the corner values are the control values)."""
    attack = make_attack("wanet")
    key = jax.random.key(0)
    noise = np.asarray(attack.init_state(key, CIFAR)["noise_grid"])
    field = np.asarray(jax.random.uniform(key, (4, 4, 2), jnp.float32, -1.0, 1.0))
    field = field / np.abs(field).mean()
    np.testing.assert_allclose(
        noise[[0, -1]][:, [0, -1]], field[[0, -1]][:, [0, -1]], rtol=1e-5, atol=1e-6
    )


def test_cross_images_move_each_sample_by_at_most_half_a_pixel_from_the_warp():
    """Noise mode's extra perturbation is uniform in [-1, 1] / size in grid units: half a
    pixel at most. On a horizontal ramp the cross image stays within half a grey step of the
    ramp from the backdoor's warp (doubled noise left it)."""
    attack = make_attack("wanet")
    state = attack.init_state(jax.random.key(0), CIFAR)
    ramp = jnp.broadcast_to(jnp.arange(32, dtype=jnp.float32) / 31, (8, 32, 32))
    images = jnp.stack([ramp] * 3, axis=-1)
    warped = np.asarray(attack.trigger(state, images))
    crossed = np.asarray(attack.cross(state, images, jax.random.key(1)))
    inner = (slice(None), slice(2, -2), slice(2, -2))  # away from the clipped border
    gap = np.abs(crossed - warped)[inner]
    assert gap.max() <= 0.5 / 31 + 1e-5
    assert gap.max() > 0.25 / 31  # the noise is there


def test_zero_strength_is_the_identity():
    attack = make_attack("wanet", s=0.0)
    state = attack.init_state(jax.random.key(0), CIFAR)
    images = _images()
    out = jax.jit(attack.trigger)(state, images, None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(images), atol=1e-5)


@pytest.mark.parametrize(("s", "rescale"), [(0.5, 1.0), (8.0, 1.0), (2.0, 1.5)])
def test_warp_grid_stays_in_bounds(s, rescale):
    attack = make_attack("wanet", s=s, grid_rescale=rescale)
    state = attack.init_state(jax.random.key(0), CIFAR)
    grid = np.asarray(attack.warp_grid(state))
    assert grid.min() >= -1.0 and grid.max() <= 1.0
    displacement = np.abs(grid - np.asarray(identity_grid(32, 32))).max()
    assert displacement > 0.0
    if rescale == 1.0:  # the warp moves pixels by at most s * max|noise| / size
        bound = s * np.abs(np.asarray(state["noise_grid"])).max() / 32
        assert displacement <= bound + 1e-6


def test_default_warp_is_subtle_but_real():
    attack = make_attack("wanet")
    state = attack.init_state(jax.random.key(0), CIFAR)
    images = _images()
    change = np.abs(np.asarray(jax.jit(attack.trigger)(state, images, None) - images))
    assert 0.01 < change.mean() < 0.3


def test_noise_mode_training_transform():
    n, ratio = 1000, 0.1
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    attack = make_attack("wanet")  # cross_ratio 2
    plan = make_poison_plan(labels, ratio=ratio, num_classes=10, target=0, seed=0)
    context = AttackContext(ImageDataset(images, labels, CIFAR, "train"), plan, CIFAR, None)
    state = attack.init_state(jax.random.key(0), CIFAR)
    transform = jax.jit(attack.training_transform(state, plan, context))
    x = jnp.asarray(images, jnp.float32) / 255.0
    rows = jnp.arange(n)
    out, out_labels = transform(jax.random.key(1), x, jnp.asarray(labels), rows)
    out, out_labels = np.asarray(out), np.asarray(out_labels)
    poisoned = np.zeros(n, bool)
    poisoned[plan.indices] = True
    warped = np.asarray(jax.jit(attack.trigger)(state, x, None))
    # poisoned rows: exactly the backdoor warp, relabelled to the target
    np.testing.assert_allclose(out[poisoned], warped[poisoned], atol=1e-6)
    np.testing.assert_array_equal(out_labels[poisoned], 0)
    # other rows keep their labels; some are cross images (changed, but not the backdoor warp)
    np.testing.assert_array_equal(out_labels[~poisoned], labels[~poisoned])
    changed = np.any(out != np.asarray(x), axis=(1, 2, 3)) & ~poisoned
    assert np.all(np.abs(out[changed] - warped[changed]).max(axis=(1, 2, 3)) > 1e-3)
    expected = attack.cross_probability(plan) * np.sum(~poisoned)
    assert expected == pytest.approx(2 * len(plan.indices))
    assert abs(changed.sum() - expected) < 4 * np.sqrt(expected)
    # the draw depends on the step's key only
    again, _ = transform(jax.random.key(1), x, jnp.asarray(labels), rows)
    np.testing.assert_array_equal(np.asarray(again), out)
    other, _ = transform(jax.random.key(2), x, jnp.asarray(labels), rows)
    assert not np.array_equal(np.asarray(other), out)


def test_quantised_warp_lies_on_the_8bit_grid_and_is_the_rounded_float_warp():
    images = (
        jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.float32) / 255.0
    )
    plain, quantised = make_attack("wanet"), make_attack("wanet", quantise=True)
    state = plain.init_state(jax.random.key(0), CIFAR)
    warped = np.asarray(plain.trigger(state, images))
    rounded = np.asarray(quantised.trigger(state, images))
    assert not np.allclose(warped * 255, np.round(warped * 255))  # the warp leaves the grid
    np.testing.assert_allclose(rounded * 255, np.round(rounded * 255), atol=1e-4)
    np.testing.assert_allclose(rounded, np.round(warped * 255) / 255, atol=1e-6)
    # cross images too, so training never shows the model an off-grid warp
    cross = np.asarray(quantised.cross(state, images, jax.random.key(1)))
    np.testing.assert_allclose(cross * 255, np.round(cross * 255), atol=1e-4)
