"""What an attack refuses before it trains: a plan made for another set or of the other kind
(clean- or dirty-label), and a classifier that does not fit the data."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fippure.attacks import AttackContext, make_attack, make_poison_plan
from fippure.data.sources import load_dataset
from fippure.errors import InvalidInputError
from fippure.models import create_model, init_variables
from fippure.training import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _context(data, clean_label=False, reference=None):
    plan = make_poison_plan(data.labels, ratio=0.1, num_classes=10, clean_label=clean_label)
    return AttackContext(data, plan, data.spec, jax.random.key(0), reference, progress=False)


def _classifier(data, num_classes=10, width=4):
    model = create_model("small_cnn", num_classes, width=width)
    return model, init_variables(model, jax.random.key(0), data.spec.image_shape)


def test_a_plan_made_for_another_training_set_is_refused(digits):
    # its rows index the other set: unplanned images (target-class ones too) were poisoned
    plan = make_poison_plan(digits.labels, ratio=0.1, num_classes=10)
    smaller = digits.subset(np.arange(1337))
    with pytest.raises(InvalidInputError, match="made for 1437 examples, but the training"):
        AttackContext(smaller, plan, digits.spec, jax.random.key(0))


@pytest.mark.parametrize("name", ["sig", "clb", "badnets", "input_aware", "lira"])
def test_a_plan_of_the_other_kind_is_refused(digits, name):
    # CLB ran PGD on non-target images and trained them relabelled: dirty-label poisoning
    attack = make_attack(name)
    context = _context(digits, clean_label=not attack.clean_label)
    state = attack.init_state(jax.random.key(1), digits.spec)
    model, variables = _classifier(digits)
    config = TrainConfig(epochs=1, batch_size=128)
    with pytest.raises(InvalidInputError, match="attack but the poisoning plan is not"):
        if name == "clb":
            attack.fit(state, _context(digits, False, reference=(model, variables)))
        else:
            attack.train_backdoored(state, context, model, variables, config)


@pytest.mark.parametrize("name", ["input_aware", "lira"])
@pytest.mark.parametrize(
    ("classes", "width", "message"),
    [(5, 4, "outputs have shape"), (10, 8, "variables do not fit")],
    ids=["five_classes", "other_width"],
)
def test_the_joint_attacks_check_the_classifier_like_training_does(
    digits, name, classes, width, message
):
    # a 5-class model trained silently (LIRA) or ended in a NaN "lower the learning rate";
    # another model's variables gave a Flax traceback
    attack = make_attack(name)
    model = create_model("small_cnn", classes, width=4)
    _, variables = _classifier(digits, classes, width)
    state = attack.init_state(jax.random.key(1), digits.spec)
    config = TrainConfig(epochs=1, batch_size=128)
    with pytest.raises(InvalidInputError, match=message):
        attack.train_backdoored(state, _context(digits), model, variables, config)


def test_the_training_transform_poisons_the_planned_rows_of_a_batch_only():
    """In-graph poisoning reads the plan by dataset row, not by position in the batch: the
    planned rows are triggered and relabelled, the others pass unchanged."""
    import jax.numpy as jnp

    from fippure.data.catalog import get_spec

    labels = np.arange(40) % 10
    plan = make_poison_plan(labels, ratio=0.25, num_classes=10, target=0, seed=0)
    attack = make_attack("badnets")
    spec = get_spec("cifar10")
    transform = attack.training_transform({}, plan, None)
    rows = np.array([plan.indices[0], 1, plan.indices[1], 3, 5, plan.indices[2]])
    rows = np.array([r for r in dict.fromkeys(rows.tolist())])
    images = jnp.full((len(rows), *spec.image_shape), 0.5)
    out, new_labels = transform(jax.random.key(0), images, jnp.asarray(labels[rows]), rows)
    planned = np.isin(rows, plan.indices)
    assert planned.any() and (~planned).any()
    corner = np.asarray(out[:, -1, -1, 0])
    np.testing.assert_array_equal(corner, np.where(planned, 1.0, 0.5))
    np.testing.assert_array_equal(np.asarray(new_labels), np.where(planned, 0, labels[rows]))
