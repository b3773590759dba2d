"""ISSBA: a bounded, sample-specific residual that carries a readable secret code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.data.catalog import get_spec
from fippure.data.sources import load_dataset
from fippure.errors import InvalidInputError
from fippure.models.registry import count_params
from fippure.recipes import train_backdoored
from fippure.training import TrainConfig
from fippure.zoo import load_backdoored

#: Digits-sized settings: 8x8 grey images carry fewer bits, and a residual of 0.05 sits below
#: their 1/16 grey levels, where the decoder cannot tell it from the image in a short fit.
DIGITS = {"num_bits": 8, "eps": 0.1, "fit_steps": 600}


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_trigger_is_bounded_deterministic_and_jittable(dataset):
    spec = get_spec(dataset)
    attack = make_attack("issba", eps=0.05)
    state = attack.init_state(jax.random.key(0), spec)
    images = jax.random.uniform(jax.random.key(1), (8, *spec.image_shape))
    out = jax.jit(attack.trigger)(state, images, jax.random.key(2))
    assert out.shape == images.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(jnp.max(jnp.abs(out - images))) <= 0.05 + 1e-6
    again = attack.trigger(state, images, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(out), np.asarray(again), atol=1e-6)
    # Sample-specific: the residual is not one fixed pattern.
    residual = np.asarray(attack.residual(state, images))
    assert np.abs(residual[0] - residual[1]).max() > 1e-4


def test_code_is_drawn_from_the_key_and_the_saved_state_is_small():
    attack = make_attack("issba")
    spec = get_spec("cifar10")
    state = attack.init_state(jax.random.key(0), spec)
    assert state["code"].shape == (32,)
    assert set(np.unique(np.asarray(state["code"]))) == {0.0, 1.0}
    other = attack.init_state(jax.random.key(1), spec)
    assert np.any(np.asarray(state["code"]) != np.asarray(other["code"]))
    saved = attack.saved_state(state)
    assert set(saved) == {"code", "encoder"}
    assert count_params(saved) < 150_000


@pytest.fixture(scope="module")
def fitted(full_optimization):
    data = load_dataset("digits", "train")
    attack = make_attack("issba", **DIGITS)
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10)
    context = AttackContext(data, plan, data.spec, jax.random.key(0), progress=False)
    with full_optimization():
        return attack, attack.fit(attack.init_state(jax.random.key(1), data.spec), context)


def test_fitted_decoder_reads_the_code(fitted):
    attack, state = fitted
    images = jnp.asarray(load_dataset("digits", "test").images, jnp.float32) / 255
    encoded = attack.trigger(state, images)
    read = np.asarray(attack.decode(state, encoded)) > 0.5
    code = np.asarray(state["code"]) > 0.5
    assert np.mean(read == code) >= 0.95
    # Without the residual the decoder reads (close to) nothing of it.
    assert np.mean((np.asarray(attack.decode(state, images)) > 0.5) == code) < 0.8
    assert float(jnp.max(jnp.abs(encoded - images))) <= DIGITS["eps"] + 1e-6


def test_digits_backdoor_is_learnt(tmp_path, optimized_compilation):
    config = TrainConfig(
        epochs=10, batch_size=64, learning_rate=0.1, eval_every=100, checkpoint_every=10**6
    )
    report = train_backdoored(
        dataset="digits",
        model="small_cnn",
        model_kwargs={"width": 16},
        out=tmp_path / "issba",
        config=config,
        attack="issba",
        attack_options=DIGITS,
        ratio=0.1,
        progress=False,
    )
    assert report["asr"] >= 0.8, report
    assert report["test_accuracy"] >= 0.9, report
    loaded = load_backdoored(tmp_path / "issba")
    assert set(loaded.attack_state) == {"code", "encoder"}  # the decoder is not saved


@pytest.mark.parametrize("options", [{"eps": 0.0}, {"num_bits": 0}, {"fit_noise": -0.1}])
def test_bad_options_are_rejected_in_one_line(options):
    with pytest.raises(InvalidInputError, match="must be"):
        make_attack("issba", **options)
