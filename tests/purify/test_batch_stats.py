"""Re-estimating BatchNorm statistics on the clean set ("precise BN")."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clean_sets import random_digits_clean_set

from fippure.data import normalize, to_unit_range
from fippure.errors import InvalidInputError
from fippure.purify import fip, ft, nft
from fippure.purify.batch_stats import (
    finalise_batch_stats,
    recompute_batch_stats,
    transfer_batch_stats,
)
from fippure.purify.common import sample_clean_batch


class NormalisedLinear(nn.Module):
    """Flatten, BatchNorm with an unusual momentum, dense head."""

    momentum: float = 0.7
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1)) * self.scale
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def clean_set():
    return random_digits_clean_set(per_class=3)


@pytest.mark.parametrize("momentum", [0.9, 0.7, 0.99])
def test_full_batch_statistics_are_the_population_mean_and_variance(clean_set, momentum):
    model = NormalisedLinear(momentum=momentum)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    new = recompute_batch_stats(
        model, variables, clean_set, jax.random.key(1), batches=3, batch_size=30, augment=False
    )
    x = normalize(to_unit_range(jnp.asarray(clean_set.images)), clean_set.spec).reshape(30, -1)
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], x.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["var"], x.var(0), atol=1e-5)
    assert new["params"] is variables["params"]


def test_bfloat16_statistics_are_estimated_in_float32_and_returned_in_bfloat16(clean_set):
    """apply_model keeps the statistics' dtype: the estimate's three updates of one batch,
    taken in bfloat16, had put 0.004 on the momentum and, divided by 1 - m, a 28% error on
    the mean at momentum 0.99."""
    model = NormalisedLinear(momentum=0.99)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    low = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
    same_values = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), low)
    key = jax.random.key(1)
    estimates = [
        recompute_batch_stats(model, v, clean_set, key, batches=3, batch_size=10, augment=False)
        for v in (low, same_values)
    ]
    for name in ("mean", "var"):
        got, expected = (e["batch_stats"]["BatchNorm_0"][name] for e in estimates)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            expected,
            rtol=2**-7,
            atol=1e-3 * float(abs(expected).max()),
        )


def test_large_statistics_keep_their_precision(clean_set):
    """Activations of scale 3000 (variances near 1e7, as an unnormalised input gives): reading
    the momentum as ``(from 1) - (from 0)`` lost it to rounding and gave variances 20% low."""
    model = NormalisedLinear(momentum=0.9, scale=3e3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    new = recompute_batch_stats(
        model, variables, clean_set, jax.random.key(1), batches=3, batch_size=30, augment=False
    )
    x = normalize(to_unit_range(jnp.asarray(clean_set.images)), clean_set.spec).reshape(30, -1)
    x = np.asarray(x, np.float64) * 3e3
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-4, atol=1e-2)


def test_small_batches_average_their_statistics(clean_set):
    """With batches of 10 the estimate is the mean of the batch statistics: close to, not
    equal to, the population's."""
    model = NormalisedLinear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    new = recompute_batch_stats(
        model, variables, clean_set, jax.random.key(2), batches=200, batch_size=10, augment=False
    )
    x = normalize(to_unit_range(jnp.asarray(clean_set.images)), clean_set.spec).reshape(30, -1)
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], x.mean(0), atol=0.05 * float(x.std()))
    # a batch variance underestimates the population's by (n - 1) / n on average
    ratio = np.asarray(stats["var"]).mean() / float(x.var(0).mean())
    assert 0.85 < ratio < 0.97


def test_the_estimate_averages_each_of_its_batches_once(clean_set):
    """The mean of the statistics of the batches drawn with ``split(key, batches)``, each
    counted once (a loop that counted the first twice and dropped the last passed the
    population-level tests)."""
    model = NormalisedLinear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    key = jax.random.key(3)
    new = recompute_batch_stats(
        model, variables, clean_set, key, batches=3, batch_size=8, augment=False
    )
    images, labels = jnp.asarray(clean_set.images), jnp.asarray(clean_set.labels)
    batches = [
        sample_clean_batch(k, images, labels, 8, clean_set.spec, False)[0].reshape(8, -1)
        for k in jax.random.split(key, 3)
    ]
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], np.mean([x.mean(0) for x in batches], 0), atol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([x.var(0) for x in batches], 0), atol=1e-5)


def test_same_key_same_statistics_and_no_batch_stats_is_a_no_op(clean_set):
    model = NormalisedLinear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    a = recompute_batch_stats(model, variables, clean_set, jax.random.key(3), batches=4)
    b = recompute_batch_stats(model, variables, clean_set, jax.random.key(3), batches=4)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    dense = nn.Dense(10)
    dense_vars = dense.init(jax.random.key(0), jnp.zeros((1, 64)))
    assert recompute_batch_stats(dense, dense_vars, clean_set, jax.random.key(3)) == dense_vars
    with pytest.raises(InvalidInputError, match="batches"):
        recompute_batch_stats(model, variables, clean_set, jax.random.key(3), batches=0)


class DenseThenNorm(nn.Module):
    """Dense, BatchNorm, dense head: the statistics depend on the first layer's weights."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(x)


def _before_and_after(seed: int = 0):
    """A DenseThenNorm with arbitrary stored statistics, and a copy whose first layer moved."""
    model = DenseThenNorm()
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 1), 3)
    stored = {"BatchNorm_0": {"mean": jax.random.normal(k1, (6,)), "var": 0.5 + jnp.arange(6.0)}}
    original = {**variables, "batch_stats": stored}
    params = jax.tree_util.tree_map(lambda p: p, variables["params"])
    params["Dense_0"] = {
        "kernel": params["Dense_0"]["kernel"] + 0.1 * jax.random.normal(k2, (64, 6)),
        "bias": params["Dense_0"]["bias"] + jax.random.normal(k3, (6,)),
    }
    return model, original, {**original, "params": params}


def test_transfer_keeps_the_original_statistics_when_the_weights_did_not_move(clean_set):
    model, original, _ = _before_and_after()
    out = transfer_batch_stats(model, original, original, clean_set, jax.random.key(4), batches=3)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        out["batch_stats"],
        original["batch_stats"],
    )


def test_frozen_variables_are_accepted_and_give_the_same_statistics(clean_set):
    model, original, purified = _before_and_after()
    key = jax.random.key(4)
    frozen_original, frozen_purified = flax.core.freeze(original), flax.core.freeze(purified)
    pairs = [
        (
            recompute_batch_stats(model, frozen_purified, clean_set, key, batches=2),
            recompute_batch_stats(model, purified, clean_set, key, batches=2),
        ),
        (
            transfer_batch_stats(model, frozen_original, frozen_purified, clean_set, key),
            transfer_batch_stats(model, original, purified, clean_set, key),
        ),
    ]
    for from_frozen, from_plain in pairs:
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, flax.core.unfreeze(from_frozen), from_plain
        )


def test_transfer_moves_the_stored_statistics_by_the_change_on_the_clean_set(clean_set):
    """Full batches, no augmentation: mean0 + m(after) - m(before), var0 * v(after)/v(before),
    with m and v the clean set's pre-BN mean and variance under each set of weights."""
    model, original, purified = _before_and_after()
    out = transfer_batch_stats(
        model,
        original,
        purified,
        clean_set,
        jax.random.key(5),
        batches=2,
        batch_size=30,
        augment=False,
    )
    x = normalize(to_unit_range(jnp.asarray(clean_set.images)), clean_set.spec).reshape(30, -1)

    def pre_bn(params):
        h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
        return h.mean(0), h.var(0)

    (m0, v0), (m1, v1) = pre_bn(original["params"]), pre_bn(purified["params"])
    stored = original["batch_stats"]["BatchNorm_0"]
    stats = out["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], stored["mean"] + m1 - m0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["var"], stored["var"] * v1 / v0, rtol=1e-4)
    assert out["params"] is purified["params"]


def test_transfer_rejects_statistics_it_does_not_know(clean_set):
    model, original, purified = _before_and_after()
    other = {**purified, "batch_stats": {"BatchNorm_1": original["batch_stats"]["BatchNorm_0"]}}
    with pytest.raises(InvalidInputError, match="do not match"):
        transfer_batch_stats(model, original, other, clean_set, jax.random.key(0))
    odd = {"BatchNorm_0": {"mean": jnp.zeros(6), "count": jnp.zeros(())}}
    with pytest.raises(InvalidInputError, match="count"):
        transfer_batch_stats(
            model,
            {**original, "batch_stats": odd},
            {**purified, "batch_stats": odd},
            clean_set,
            jax.random.key(0),
        )
    with pytest.raises(InvalidInputError, match="final_batch_stats"):
        finalise_batch_stats("precise", model, original, purified, clean_set, jax.random.key(0))


#: FT, FIP and NFT (whose running statistics average MixUp batches), each with its settings.
FINISHED_DEFENSES = (
    ("ft", ft, ft.FTConfig, {}),
    # SPEC's lr 0.005 diverges on the digits CNN within a few steps (weights ~1e10)
    (
        "fip",
        fip,
        fip.FIPConfig,
        {"fisher_chunk": 32, "learning_rate": 0.001, "max_grad_norm": 10.0},
    ),
    ("nft", nft, nft.NFTConfig, {"mask_pattern": "bn[23]$"}),
)


def _base_settings(extra):
    return dict(steps=6, batch_size=64, log_every=3, **extra)


@pytest.fixture(scope="module")
def plain_runs(digits_badnets, built_once_per_run):
    """Each defense's 6-step run with its statistics left as the steps made them."""
    bd = digits_badnets

    def build():
        return {
            name: jax.device_get(
                module.purify(
                    bd.model,
                    bd.variables,
                    bd.clean,
                    config_type(**_base_settings(extra)),
                    jax.random.key(0),
                    progress=False,
                )[0]
            )
            for name, module, config_type, extra in FINISHED_DEFENSES
        }

    return built_once_per_run("batch_stats_plain_runs", build)


@pytest.mark.parametrize("mode", ["recompute", "transfer"])
def test_defenses_can_finish_with_recomputed_or_transferred_statistics(
    digits_badnets, plain_runs, mode
):
    """The weights are those of the plain run; only the running statistics differ, and they are
    exactly what the batch-statistics functions give on the plain result."""
    bd = digits_badnets
    key = jax.random.key(0)
    for name, module, config_type, extra in FINISHED_DEFENSES:
        plain = plain_runs[name]
        config = config_type(**_base_settings(extra), final_batch_stats=mode, stats_batches=3)
        out, report = module.purify(bd.model, bd.variables, bd.clean, config, key, progress=False)
        jax.tree_util.tree_map(np.testing.assert_array_equal, plain["params"], out["params"])
        expected = finalise_batch_stats(
            mode,
            bd.model,
            bd.variables,
            plain,
            bd.clean,
            jax.random.fold_in(key, 6),
            batches=3,
            batch_size=64,
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            expected["batch_stats"],
            out["batch_stats"],
        )
        assert report.config["final_batch_stats"] == mode, name
    with pytest.raises(InvalidInputError, match="stats_batches"):
        fip.FIPConfig(final_batch_stats=mode, stats_batches=0)
    with pytest.raises(InvalidInputError, match="final_batch_stats"):
        nft.NFTConfig(final_batch_stats="clean")
