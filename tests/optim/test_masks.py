"""BatchNorm masks: selection, identity at ones, gamma scaling, layer order and mu(l)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fippure.errors import InvalidInputError
from fippure.optim import masks, project_box


@pytest.fixture(scope="module")
def resnet():
    from fippure.models import create_model, init_variables

    model = create_model("preact_resnet18", 10, width=16)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    return model, variables


def test_residual_block_batchnorms_are_masked_in_network_order(resnet):
    _, variables = resnet
    m = masks.init_masks(variables["params"])
    modules = masks.masked_modules(variables["params"])
    expected = [
        (f"stage{s}_block{b}", f"bn{i}") for s in range(1, 5) for b in (1, 2) for i in (1, 2)
    ]
    assert modules == expected
    assert "bn_final" not in m
    assert m["stage1_block1"]["bn1"].shape == (16,)  # bn1 normalises the block input
    assert m["stage2_block1"]["bn2"].shape == (32,)
    assert all(np.all(leaf == 1) for leaf in jax.tree_util.tree_leaves(m))
    indices = masks.mask_layer_indices(m)
    assert indices["stage1_block1"]["bn1"] == 1
    assert indices["stage1_block1"]["bn2"] == 2
    assert indices["stage1_block2"]["bn1"] == 3
    assert indices["stage4_block2"]["bn2"] == 16


def test_natural_order_beyond_nine():
    tree = {
        f"stage{i}_block1": {"bn1": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}}
        for i in (2, 10, 1)
    }
    order = [p[0] for p in masks.masked_modules(tree)]
    assert order == ["stage1_block1", "stage2_block1", "stage10_block1"]
    # the floors' layer index l follows the same order (plain sorting put stage10 second)
    indices = masks.mask_layer_indices({name: {"bn1": jnp.ones(2)} for name in tree})
    assert [indices[f"stage{i}_block1"]["bn1"] for i in (1, 2, 10)] == [1, 2, 3]


def test_apply_ones_is_identity_and_masks_scale_gamma(resnet):
    model, variables = resnet
    params = variables["params"]
    m = masks.init_masks(params)
    same = masks.apply_masks(params, m)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)
    channel_off = jax.tree_util.tree_map(lambda x: x, m)
    channel_off["stage2_block1"]["bn2"] = m["stage2_block1"]["bn2"].at[3].set(0.0)
    masked = masks.apply_masks(params, channel_off)
    gamma = masked["stage2_block1"]["bn2"]["scale"]
    assert gamma[3] == 0 and np.all(gamma[:3] == params["stage2_block1"]["bn2"]["scale"][:3])
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    by_hand = jax.tree_util.tree_map(lambda x: x, params)
    by_hand["stage2_block1"]["bn2"] = {
        **params["stage2_block1"]["bn2"],
        "scale": params["stage2_block1"]["bn2"]["scale"].at[3].set(0.0),
    }
    apply = jax.jit(model.apply)  # one program, not one per operation
    np.testing.assert_allclose(
        apply({**variables, "params": masked}, images),
        apply({**variables, "params": by_hand}, images),
        rtol=1e-6,
    )
    # Differentiable in the masks.
    grads = jax.jit(
        jax.grad(
            lambda mm: jnp.sum(
                model.apply({**variables, "params": masks.apply_masks(params, mm)}, images) ** 2
            )
        )
    )(m)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(m)


def test_floor_schedules():
    assert masks.mask_floor(1) == pytest.approx(0.8 * math.exp(-0.5))
    assert masks.mask_floor(4, a=0.6, b=0.25) == pytest.approx(0.6 * math.exp(-1.0))
    assert masks.mask_floor(3, "constant", a=0.3) == 0.3
    assert masks.mask_floor(1, "linear", a=0.8, b=0.1) == pytest.approx(0.7)
    assert masks.mask_floor(20, "linear", a=0.8, b=0.1) == 0.0
    with pytest.raises(Exception, match="schedule"):
        masks.mask_floor(1, "cubic")


def test_floors_feed_project_box(resnet):
    _, variables = resnet
    m = masks.init_masks(variables["params"])
    floors = masks.layer_floors(m)
    assert floors["stage1_block1"]["bn1"] == pytest.approx(0.8 * math.exp(-0.5))
    assert floors["stage4_block2"]["bn2"] == pytest.approx(0.8 * math.exp(-8.0))
    tx = optax.chain(optax.sgd(1.0), project_box(floors, 1.0))
    push = jax.tree_util.tree_map(lambda x: 5.0 * jnp.ones_like(x), m)  # descend: m -> m - 5
    updates, _ = tx.update(push, tx.init(m), m)
    new = optax.apply_updates(m, updates)
    # float32: theta + (clip(theta + u) - theta) is the floor up to one rounding.
    for module in ("stage1_block1", "bn1"), ("stage3_block2", "bn1"):
        np.testing.assert_allclose(
            new[module[0]][module[1]], floors[module[0]][module[1]], rtol=0, atol=1e-7
        )


@pytest.mark.parametrize("shape", ["column", "wider"])
def test_masks_that_do_not_match_their_batchnorm_are_refused(resnet, shape):
    # a (C, 1) mask broadcast the scale to (C, C); a wider model's masks failed inside jnp
    _, variables = resnet
    params = variables["params"]
    m = masks.init_masks(params)
    bn = m["stage2_block1"]["bn2"]
    m["stage2_block1"]["bn2"] = bn[:, None] if shape == "column" else jnp.ones(2 * bn.shape[0])
    with pytest.raises(InvalidInputError, match="mask stage2_block1/bn2 has shape"):
        masks.apply_masks(params, m)
