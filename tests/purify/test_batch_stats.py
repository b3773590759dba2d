"""Re-estimating BatchNorm statistics on the clean set ("precise BN")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clean_sets import random_digits_clean_set

from fippure.data import normalize, to_unit_range
from fippure.errors import InvalidInputError
from fippure.purify import nft
from fippure.purify.batch_stats import recompute_batch_stats


class NormalisedLinear(nn.Module):
    """Flatten, BatchNorm with an unusual momentum, dense head."""

    momentum: float = 0.7

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
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


def test_nft_can_replace_its_mixup_statistics_by_clean_ones(digits_badnets):
    """NFT's running statistics average MixUp batches; with recompute_batch_stats they are the
    clean batches' mean statistics under the final masks, and the masks are unchanged."""
    bd = digits_badnets
    base = dict(steps=20, batch_size=64, log_every=10, mask_pattern="bn[23]$")
    key = jax.random.key(0)
    plain, _ = nft.purify(
        bd.model, bd.variables, bd.clean, nft.NFTConfig(**base), key, progress=False
    )
    config = nft.NFTConfig(**base, recompute_batch_stats=True, stats_batches=5)
    recomputed, report = nft.purify(bd.model, bd.variables, bd.clean, config, key, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain["params"], recomputed["params"])
    expected = recompute_batch_stats(
        bd.model, plain, bd.clean, jax.random.fold_in(key, 20), batches=5, batch_size=64
    )
    jax.tree_util.tree_map(
        np.testing.assert_allclose, expected["batch_stats"], recomputed["batch_stats"]
    )
    assert report.config["recompute_batch_stats"] is True
