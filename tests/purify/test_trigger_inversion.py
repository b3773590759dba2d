"""Neural Cleanse trigger inversion on D_v (a defender's own trigger, SPEC section 1)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.errors import InvalidInputError
from fippure.inference import predict
from fippure.purify.trigger_inversion import (
    InversionConfig,
    InvertedTrigger,
    adapt_cost,
    anomaly_index,
    check_trigger,
    chosen_trigger,
    flagged_classes,
    inversion_loss,
    invert_trigger,
    keep_best,
    stamp,
    synthesized_asr,
)

#: For the tests of reproducibility and input checks, which need no converged trigger.
BRIEF = InversionConfig(steps=20)


def test_stamp_blends_image_and_pattern_by_the_mask():
    images = jnp.full((2, 4, 4, 3), 0.25)
    pattern = jnp.full((4, 4, 3), 0.75)
    mask = jnp.zeros((4, 4, 1)).at[0, 0].set(1.0).at[1, 1].set(0.5)
    out = stamp(images, mask, pattern)
    np.testing.assert_allclose(out[:, 0, 0], 0.75)
    np.testing.assert_allclose(out[:, 1, 1], 0.5)
    np.testing.assert_allclose(out[:, 2, 2], 0.25)


def test_anomaly_index_is_the_distance_from_the_median_in_mad_units():
    norms = np.array([1.0, 10.0, 11.0, 12.0, 13.0])
    mad = 1.4826 * np.median(np.abs(norms - 11.0))  # |deviations| 10, 1, 0, 1, 2 -> 1
    np.testing.assert_allclose(anomaly_index(norms), np.abs(norms - 11.0) / mad)
    assert flagged_classes(norms, 2.0) == (0,)
    # a class far *above* the median is not a backdoor's target
    assert flagged_classes(np.array([10.0, 11.0, 12.0, 13.0, 60.0]), 2.0) == ()
    np.testing.assert_array_equal(anomaly_index(np.full(4, 3.0)), 0.0)


def test_a_lone_small_mask_is_flagged_where_most_masks_share_one_norm():
    # nine masks saturated to the same norm: the MAD is 0, and the index of the lone small
    # one was 0 too, so nothing was flagged
    norms = np.array([10.0] * 9 + [1.0])
    np.testing.assert_array_equal(anomaly_index(norms), [0.0] * 9 + [np.inf])
    assert flagged_classes(norms, 2.0) == (9,)
    assert flagged_classes(np.array([10.0] * 6 + [11.0, 12.0, 1.0, 1.0]), 2.0) == (8, 9)


def test_the_l1_weight_rises_after_a_successful_window_and_falls_faster_after_a_failed_one():
    """NC section IV.B: every adapt_every steps, lambda * 1.5 if the window's mean success
    reached the threshold, lambda / 1.5**1.5 otherwise; the window then restarts."""
    config = InversionConfig(adapt_every=2, init_cost=1e-3, cost_multiplier=1.5)
    cost, window, index = jnp.float32(1e-3), jnp.float32(0.0), jnp.int32(0)
    costs = []
    for success in (1.0, 1.0, 0.0, 0.0, 1.0, 0.5):
        cost, window, index = adapt_cost(cost, window, index, jnp.float32(success), config)
        costs.append(float(cost))
    up, down = 1e-3 * 1.5, 1e-3 * 1.5 * 1.5**-1.5
    np.testing.assert_allclose(costs, [1e-3, up, up, down, down, down * 1.5**-1.5], rtol=1e-6)


def test_the_inversion_loss_averages_the_cross_entropy_over_non_target_images_only(
    digits_badnets,
):
    """NC Eq. 2 on a batch that mixes target-class images in: they carry no weight, so
    changing them leaves the loss as it was."""
    import optax

    from fippure.data import normalize, to_unit_range

    b = digits_badnets
    images = to_unit_range(jnp.asarray(b.clean.images[:20]))
    labels = np.asarray(b.clean.labels[:20])
    weight = jnp.asarray(labels != b.target, jnp.float32)
    assert 0 < float(weight.sum()) < 20
    raw = {"mask": jnp.full((8, 8, 1), -1.0), "pattern": jnp.zeros((8, 8, 1))}
    args = (b.model, b.variables, b.spec)
    loss, (success, l1) = inversion_loss(raw, 0.01, *args, images, weight, b.target)
    mask = jax.nn.sigmoid(raw["mask"])
    stamped = (1 - mask) * images + mask * 0.5
    logits = b.model.apply(b.variables, normalize(stamped, b.spec), train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(20, b.target))
    keep = labels != b.target
    assert float(l1) == pytest.approx(float(mask.sum()), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce[keep].mean()) + 0.01 * float(l1), rel=1e-5)
    hits = np.asarray(jnp.argmax(logits, -1) == b.target)
    assert float(success) == pytest.approx(hits[keep].mean())
    others = images.at[~keep].set(0.0)
    assert float(inversion_loss(raw, 0.01, *args, others, weight, b.target)[0]) == pytest.approx(
        float(loss), rel=1e-6
    )


def test_the_trigger_kept_is_the_smallest_that_reached_the_success_threshold():
    steps = [(0.5, 3.0), (1.0, 9.0), (0.995, 6.0), (0.9, 2.0), (1.0, 7.0)]  # (success, l1)
    best = {"raw": {"mask": jnp.float32(-1.0)}, "l1": jnp.float32(jnp.inf), "found": False}
    for i, (success, l1) in enumerate(steps):
        raw = {"mask": jnp.float32(i)}
        best = keep_best(best, raw, jnp.float32(success), jnp.float32(l1), 0.99)
    assert bool(best["found"]) and float(best["l1"]) == 6.0
    assert float(chosen_trigger(best, {"mask": jnp.float32(4.0)})["mask"]) == 2.0  # step 2
    # no step reached the threshold: the last iterate is returned
    none = {"raw": {"mask": jnp.float32(-1.0)}, "l1": jnp.float32(jnp.inf), "found": False}
    for i, (success, l1) in enumerate(steps):
        none = keep_best(none, {"mask": jnp.float32(i)}, jnp.float32(success / 2), l1, 0.99)
    assert not bool(none["found"])
    assert float(chosen_trigger(none, {"mask": jnp.float32(4.0)})["mask"]) == 4.0


def test_the_backdoor_target_needs_the_smallest_trigger(digits_badnets, digits_scan):
    """On 8x8 digits BadNets' target gets the smallest mask of the ten classes, and that
    trigger, found on 104 clean images only (``digits_scan``), also fires on the test split."""
    b, scan = digits_badnets, digits_scan
    norms = scan.mask_l1
    assert int(np.argmin(norms)) == b.target, scan.to_dict()
    assert norms[b.target] < 0.75 * np.median(norms), scan.to_dict()
    trigger = scan.triggers[b.target]
    assert trigger.mask.shape == (*b.spec.image_shape[:2], 1)
    assert trigger.pattern.shape == b.spec.image_shape
    assert 0.0 <= trigger.mask.min() and trigger.mask.max() <= 1.0
    assert trigger.success > 0.9
    test_asr = synthesized_asr(b.model, b.variables, b.test.images, b.test.labels, trigger, b.spec)
    assert test_asr > 0.8


def test_inversion_is_reproducible_from_its_key(digits_badnets, optimized_compilation):
    b = digits_badnets
    first, second = (
        invert_trigger(b.model, b.variables, b.clean, 3, BRIEF, jax.random.key(7)) for _ in range(2)
    )
    np.testing.assert_array_equal(first.mask, second.mask)
    np.testing.assert_array_equal(first.pattern, second.pattern)
    assert first.mask_l1 == second.mask_l1
    other = invert_trigger(b.model, b.variables, b.clean, 3, BRIEF, jax.random.key(8))
    assert not np.array_equal(first.mask, other.mask)  # the key is used


def test_synthesized_asr_counts_only_images_outside_the_target(digits_badnets, digits_scan):
    b = digits_badnets
    trigger = digits_scan.triggers[b.target]
    only_target = b.clean.labels == b.target
    assert np.isnan(
        synthesized_asr(
            b.model,
            b.variables,
            b.clean.images[only_target],
            b.clean.labels[only_target],
            trigger,
            b.spec,
        )
    )
    # on a mixed set: the share of the non-target images sent to the target, counted by hand
    images, labels = b.clean.images, b.clean.labels
    sent = np.asarray(predict(b.model, b.variables, trigger.stamp(images), b.spec)) == b.target
    others = labels != b.target
    assert 0 < others.sum() < len(labels) and 0 < sent[~others].sum()  # both kinds present
    asr = synthesized_asr(b.model, b.variables, images, labels, trigger, b.spec)
    assert asr == pytest.approx(sent[others].mean())
    assert asr != pytest.approx(sent.mean())


def test_a_trigger_for_other_images_gets_a_one_line_error(digits_badnets, digits_scan):
    b = digits_badnets
    trigger = digits_scan.triggers[b.target]
    cifar_sized = InvertedTrigger(
        0, np.zeros((32, 32, 1), np.float32), np.zeros((32, 32, 3), np.float32), 0.0, 0.0, False
    )
    args = (b.model, b.variables, b.clean.images, b.clean.labels)
    with pytest.raises(InvalidInputError, match=r"mask has shape \(32, 32, 1\)"):
        synthesized_asr(*args, cifar_sized, b.spec)
    with pytest.raises(InvalidInputError, match="must be an InvertedTrigger"):
        synthesized_asr(*args, {"target": 0}, b.spec)
    with pytest.raises(InvalidInputError, match="stamps a batch of shape"):
        trigger.stamp(b.clean.images[0])
    with pytest.raises(InvalidInputError, match="not a class"):
        check_trigger(trigger, b.spec, num_classes=b.target)


def test_inversion_runs_with_float64_enabled(digits_badnets):
    # the scan's carry mixed float32 scalars with float64 logits and failed to trace
    b = digits_badnets
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        trigger = invert_trigger(b.model, b.variables, b.clean, 3, BRIEF, jax.random.key(7))
    finally:
        jax.config.update("jax_enable_x64", previous)
    assert trigger.mask.shape == (8, 8, 1) and np.isfinite(trigger.mask_l1)


def test_bad_inputs_get_one_line_errors(digits_badnets):
    b = digits_badnets
    with pytest.raises(InvalidInputError, match="not a class"):
        invert_trigger(b.model, b.variables, b.clean, 10, BRIEF)
    with pytest.raises(InvalidInputError, match="class index"):
        invert_trigger(b.model, b.variables, b.clean, 1.5, BRIEF)
    with pytest.raises(InvalidInputError, match="success_threshold"):
        InversionConfig(success_threshold=0.0)
    with pytest.raises(InvalidInputError, match="cost_multiplier"):
        InversionConfig(cost_multiplier=1.0)
    missing = b.clean.subset(np.flatnonzero(b.clean.labels != 4))
    with pytest.raises(InvalidInputError):
        invert_trigger(b.model, b.variables, missing, 0, BRIEF)


def test_detect_command_writes_the_scan(
    digits_badnets_path, tmp_path, capsys, optimized_compilation
):
    """Compiled as the command line compiles it (unoptimised, the scan took 6x as long)."""
    from fippure import cli

    out = tmp_path / "scan"
    argv = ["detect", "--checkpoint", str(digits_badnets_path), "--set", "steps=5"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mask px" in printed and "flagged" in printed
    scan = json.loads((out / "scan.json").read_text())
    assert len(scan["mask_l1"]) == 10 and scan["config"]["steps"] == 5
    # which model was scanned, on how many clean images, and the run's provenance
    assert scan["checkpoint"] == str(digits_badnets_path) and scan["clean_examples"] > 0
    assert {"command", "git_revision", "machine", "date"} <= set(scan)
    with np.load(out / "triggers.npz") as saved:
        assert saved["masks"].shape == (10, 8, 8, 1)
        assert saved["patterns"].shape == (10, 8, 8, 1)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("step=5", "unknown trigger inversion option 'step'"),
        ("steps=0", "steps must be >= 1"),
        ("learning_rate=fast", "inversion.learning_rate"),
    ],
)
def test_detect_command_rejects_bad_options_in_one_line(
    digits_badnets_path, capsys, option, message
):
    from fippure import cli

    argv = ["detect", "--checkpoint", str(digits_badnets_path), "--set", option]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_a_scan_uploads_the_clean_set_once_for_all_its_classes(
    digits_badnets, monkeypatch, optimized_compilation
):
    """Every class's optimisation gets the same device arrays (no upload per class), and
    each class's trigger is still the one :func:`invert_trigger` finds with its folded key."""
    import fippure.purify.trigger_inversion as inversion

    b = digits_badnets
    seen = []
    real = inversion._optimise_trigger

    def recording(model, spec, config, batch_size, variables, images, labels, *rest):
        seen.append((images, labels))
        return real(model, spec, config, batch_size, variables, images, labels, *rest)

    monkeypatch.setattr(inversion, "_optimise_trigger", recording)
    scan = inversion.scan_classes(b.model, b.variables, b.clean, BRIEF, jax.random.key(5))
    assert len(seen) == b.clean.num_classes
    assert all(images is seen[0][0] and labels is seen[0][1] for images, labels in seen)
    alone = invert_trigger(
        b.model, b.variables, b.clean, 3, BRIEF, jax.random.fold_in(jax.random.key(5), 3)
    )
    np.testing.assert_array_equal(scan.triggers[3].mask, alone.mask)
