"""LIRA: a bounded, input-conditioned perturbation learnt with the classifier; resumable."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.attacks.lira import paired_batch, row_weights, triggered_copies
from fippure.data.catalog import get_spec
from fippure.data.sources import load_dataset
from fippure.errors import InvalidInputError
from fippure.models.registry import count_params, create_model, init_variables
from fippure.recipes import train_backdoored
from fippure.training import TrainConfig
from fippure.zoo import load_backdoored


def _images(key, shape, n=16):
    return jax.random.uniform(key, (n, *shape))


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_trigger_is_bounded_deterministic_and_jittable(dataset):
    spec = get_spec(dataset)
    attack = make_attack("lira", eps=0.03)
    state = attack.init_state(jax.random.key(0), spec)
    images = _images(jax.random.key(1), spec.image_shape)
    out = jax.jit(attack.trigger)(state, images, jax.random.key(2))
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(jnp.max(jnp.abs(out - images))) <= 0.03 + 1e-6
    assert float(jnp.max(jnp.abs(out - images))) > 0.001  # a random generator perturbs
    again = attack.trigger(state, images, jax.random.key(99))
    np.testing.assert_allclose(np.asarray(out), np.asarray(again), atol=1e-6)


def test_generator_state_is_small():
    state = make_attack("lira").init_state(jax.random.key(0), get_spec("cifar10"))
    assert count_params(state) < 150_000


def test_triggered_copies_cover_the_batch_with_margin():
    assert triggered_copies(0.1, 128) == 29  # 12.8 expected + 4 standard deviations
    assert triggered_copies(0.9, 8) == 8
    assert triggered_copies(0.01, 64) >= 1


def test_finetuning_needs_joint_epochs(tmp_path):
    data = load_dataset("digits", "train")
    attack = make_attack("lira", finetune_epochs=3)
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10)
    context = AttackContext(data, plan, data.spec, jax.random.key(0), progress=False)
    model = create_model("small_cnn", 10, width=8)
    variables = init_variables(model, jax.random.key(0), data.spec.image_shape)
    with pytest.raises(InvalidInputError, match="finetune_epochs"):
        attack.train_backdoored(
            attack.init_state(jax.random.key(0), data.spec),
            context,
            model,
            variables,
            TrainConfig(epochs=3),
        )


def _attack_digits(out, epochs=8, checkpoint_every=10**6):
    config = TrainConfig(
        epochs=epochs,
        batch_size=64,
        learning_rate=0.1,
        eval_every=100,
        checkpoint_every=checkpoint_every,
    )
    return train_backdoored(
        dataset="digits",
        model="small_cnn",
        model_kwargs={"width": 16},
        out=out,
        config=config,
        attack="lira",
        # 0.01 of the CIFAR-10 default is below the digits' 1/16 grey levels and too faint
        # for an 8x8 network in a few epochs.
        attack_options={"eps": 0.05, "finetune_epochs": 2},
        ratio=0.1,
        progress=False,
    )


def test_digits_backdoor_is_learnt_and_reloads(tmp_path, optimized_compilation):
    report = _attack_digits(tmp_path / "lira")
    assert report["asr"] >= 0.8, report
    assert report["test_accuracy"] >= 0.85, report
    assert [h["phase"] for h in report["history"]][-2:] == ["finetune", "finetune"]
    loaded = load_backdoored(tmp_path / "lira")
    delta = np.abs(
        loaded.triggered.images - loaded.test.images[loaded.triggered.source_indices] / 255
    )
    assert delta.max() <= 0.05 + 1e-6


def test_rerun_resumes_from_the_checkpoint(tmp_path):
    """A finished run is not retrained; one whose last checkpoint is lost resumes from the
    one before and ends with the same model."""
    out = tmp_path / "lira"
    first = _attack_digits(out, epochs=3, checkpoint_every=0)  # a save at every epoch's end
    again = _attack_digits(out, epochs=3)
    assert again["resumed_from_step"] == 3 * (first["train_examples"] // 64)
    assert again["asr"] == first["asr"] and again["test_accuracy"] == first["test_accuracy"]
    checkpoints = sorted((out / "train" / "checkpoints").iterdir(), key=lambda p: int(p.name))
    shutil.rmtree(checkpoints[-1])  # as if killed before the last save
    resumed = _attack_digits(out, epochs=3)
    assert 0 < resumed["resumed_from_step"] < again["resumed_from_step"]
    assert resumed["asr"] == first["asr"]
    assert resumed["test_accuracy"] == first["test_accuracy"]


def test_copies_and_clean_images_are_weighted_per_image():
    copied = jnp.array([True, True, False])  # two real copies, one padding row
    weights = np.asarray(row_weights(8, copied, alpha=0.5))
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[:8], 1.0 / 10)  # 8 clean + 2 copies, equal weight
    np.testing.assert_allclose(weights[8:], [0.1, 0.1, 0.0])
    skewed = np.asarray(row_weights(8, copied, alpha=0.8))
    np.testing.assert_allclose(skewed[8] / skewed[0], 4.0, rtol=1e-6)


def test_paired_batch_triggers_poisoned_rows_and_pads_with_clean_duplicates():
    x = jnp.arange(5, dtype=jnp.float32)[:, None, None, None] * jnp.ones((5, 2, 2, 1)) / 10
    y = jnp.array([0, 1, 2, 3, 4])
    poisoned = jnp.array([False, True, False, True, False])
    poison_label = jnp.full((5,), 9)
    inputs, labels, copied = paired_batch(x, y, poisoned, poison_label, lambda im: im + 1.0, 3)
    np.testing.assert_array_equal(np.asarray(copied), [True, True, False])
    np.testing.assert_array_equal(np.asarray(inputs[:5]), np.asarray(x))
    # rows 1 and 3 are triggered copies with the attack label ...
    np.testing.assert_allclose(np.asarray(inputs[5:7]), np.asarray(x[jnp.array([1, 3])] + 1.0))
    np.testing.assert_array_equal(np.asarray(labels), [0, 1, 2, 3, 4, 9, 9, 0])
    # ... and the spare slot is an untriggered clean row (it never shifts BatchNorm's batch)
    np.testing.assert_array_equal(np.asarray(inputs[7]), np.asarray(x[0]))
