"""FT and FT-SAM steps against hand-written references (SPEC section 6): momentum, ASAM's eta
and adaptive settings, the returned BatchNorm statistics and the documented defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clean_sets import random_digits_clean_set
from jax.flatten_util import ravel_pytree

from fippure.data import normalize, to_unit_range
from fippure.models import create_model, init_variables
from fippure.purify import ft


@pytest.fixture(scope="module")
def tiny():
    clean = random_digits_clean_set(per_class=4)
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(1), clean.spec.image_shape)
    inputs = normalize(to_unit_range(jnp.asarray(clean.images)), clean.spec)
    return model, variables, clean, inputs, jnp.asarray(clean.labels)


@pytest.mark.parametrize("adaptive, eta", [(True, 0.3), (False, 0.01)])
def test_ft_sam_uses_its_eta_and_adaptive_settings(tiny, adaptive, eta):
    model, variables, clean, inputs, labels = tiny
    lr, rho = 0.05, 0.5
    config = ft.FTSAMConfig(
        steps=1,
        batch_size=len(clean),
        learning_rate=lr,
        momentum=0.0,
        weight_decay=0.0,
        rho=rho,
        eta=eta,
        adaptive=adaptive,
        label_smoothing=0.0,
        augment=False,
        bn_train=False,
        schedule="constant",
    )
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)

    def loss(params):
        logits = model.apply({**variables, "params": params}, inputs, train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    @jax.jit
    def step(theta):
        g = jax.grad(loss)(theta)
        scale = jax.tree_util.tree_map(
            lambda p: (jnp.abs(p) + eta) if adaptive else jnp.ones_like(p), theta
        )
        tg = jax.tree_util.tree_map(jnp.multiply, scale, g)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tg)))
        point = jax.tree_util.tree_map(lambda p, t, x: p + rho * t * x / norm, theta, scale, tg)
        return jax.tree_util.tree_map(lambda p, gs: p - lr * gs, theta, jax.grad(loss)(point))

    want = step(variables["params"])
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )


def _ce(model, variables, inputs, labels):
    def loss(params):
        logits = model.apply({**variables, "params": params}, inputs, train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    return loss


def test_ft_steps_carry_their_momentum(tiny):
    """Two constant-rate steps with momentum m: theta2 = theta1 - lr (g1 + m g0)."""
    model, variables, clean, inputs, labels = tiny
    lr, m = 0.05, 0.9
    config = ft.FTConfig(
        steps=2,
        batch_size=len(clean),
        learning_rate=lr,
        schedule="constant",
        momentum=m,
        weight_decay=0.0,
        augment=False,
        bn_train=False,
    )
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    grad = jax.jit(jax.grad(_ce(model, variables, inputs, labels)))
    theta0 = variables["params"]
    g0 = grad(theta0)
    theta1 = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta0, g0)
    g1 = grad(theta1)
    want = jax.tree_util.tree_map(lambda p, a, b: p - lr * (a + m * b), theta1, g1, g0)
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )


def test_ft_in_bn_train_mode_returns_the_running_statistics_its_steps_updated(tiny):
    """One train-mode step on the whole clean set: the returned running statistics are the
    ones BatchNorm's train-mode pass over that batch leaves."""
    model, variables, clean, inputs, _ = tiny
    config = ft.FTConfig(
        steps=1,
        batch_size=len(clean),
        learning_rate=0.01,
        augment=False,
        bn_train=True,
        final_batch_stats="running",
    )
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    _, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        out["batch_stats"],
        updates["batch_stats"],
    )
    assert any(
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(out["batch_stats"]),
            jax.tree_util.tree_leaves(variables["batch_stats"]),
            strict=True,
        )
    )


def test_ft_and_ft_sam_defaults_are_the_documented_ones():
    """BackdoorBench's FT settings; FT-SAM: ASAM with rho 2.0, eta 0.01, label smoothing 0.1."""
    sam = ft.FTSAMConfig()
    assert (sam.rho, sam.eta, sam.adaptive, sam.label_smoothing) == (2.0, 0.01, True, 0.1)
    plain = ft.FTConfig()
    assert (plain.learning_rate, plain.momentum, plain.weight_decay, plain.schedule) == (
        0.01,
        0.9,
        5e-4,
        "cosine",
    )
    assert plain.label_smoothing == 0.0
