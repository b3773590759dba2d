"""A researcher's own Flax classifier: what the defenses cannot call is refused in one line
(fippure.models.contract), before any work, instead of a JAX or Flax traceback."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.curvature.analysis import AnalysisConfig, analyze_curvature
from fippure.data.catalog import get_spec
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.models import FEATURES
from fippure.purify import get_defense, make_config

DEFENSES = ["fip", "fast_fip", "nft", "ngf", "ft", "ft_sam"]


def _digits_clean_set():
    spec = get_spec("digits")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, *spec.image_shape), dtype=np.uint8)
    return ImageDataset(images, np.arange(40, dtype=np.int32) % 10, spec, "clean")


@pytest.fixture(scope="module")
def clean_set():
    return _digits_clean_set()


def _trunk(x, bn):
    return nn.relu(bn(nn.Conv(4, (3, 3))(x))).mean((1, 2))


class Widths(nn.Module):
    """A list field, a common way to write a model: not hashable."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


class LogitsAndFeatures(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        features = _trunk(x, nn.BatchNorm(use_running_average=not train))
        return nn.Dense(10, name="head")(features), features


class Deterministic(nn.Module):
    """Another name for the mode switch (``deterministic``, not ``train``)."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(10, name="head")(_trunk(x, nn.BatchNorm(use_running_average=deterministic)))


class SyncedBatchNorm(nn.Module):
    """Its BatchNorm averages over a pmap axis in train mode."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)
        return nn.Dense(10, name="head")(_trunk(x, bn))


def _purify(defense, model, variables, clean_set):
    overrides = {"steps": "2", "batch_size": "8"}
    if defense == "nft":  # these models have one unnamed BatchNorm
        overrides["mask_pattern"] = "BatchNorm_0"
    return get_defense(defense).purify(
        model, variables, clean_set, make_config(defense, overrides), jax.random.key(0),
        progress=False,
    )  # fmt: skip


def _variables(model, clean_set):
    variables = model.init(jax.random.key(0), jnp.zeros((1, *clean_set.spec.image_shape)))
    return {k: v for k, v in variables.items() if k != "intermediates"}


CASES = {
    "unhashable": (Widths(widths=[4, 4]), "cannot be hashed .*give it tuples"),
    "tuple_output": (LogitsAndFeatures(), r"returns a tuple of 2 arrays"),
    "no_train_keyword": (Deterministic(), "Deterministic.__call__ takes no train keyword"),
}


@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_the_defenses_cannot_call_is_refused_in_one_line(clean_set, defense, case):
    """A list field had raised JAX's non-hashable static argument error (NGF only after all
    its steps), a (logits, features) output an AttributeError, and Fast FIP a TypeError for a
    model without ``train``."""
    model, message = CASES[case]
    variables = (
        _variables(Widths(widths=(4, 4)), clean_set)
        if case == "unhashable"
        else _variables(model, clean_set)
    )
    with pytest.raises(InvalidInputError, match=message):
        _purify(defense, model, variables, clean_set)


@pytest.mark.parametrize("case", ["tuple_output", "no_train_keyword"])
def test_analyze_curvature_refuses_the_same_models(clean_set, case):
    model, message = CASES[case]
    inputs = jnp.zeros((4, *clean_set.spec.image_shape))
    with pytest.raises(InvalidInputError, match=message):
        analyze_curvature(
            model, _variables(model, clean_set), inputs, jnp.zeros(4, jnp.int32),
            jax.random.key(0), AnalysisConfig(power_iters=2, lanczos_iters=2, top_k=1),
        )  # fmt: skip


@pytest.mark.parametrize("defense", ["ft", "nft", "fast_fip"])
def test_a_batchnorm_synced_over_a_mapped_axis_is_refused_with_the_way_out(clean_set, defense):
    """Flax raised NameError: unbound axis name, outside pmap."""
    variables = _variables(SyncedBatchNorm(), clean_set)
    with pytest.raises(InvalidInputError, match="axis_name=None"):
        _purify(defense, SyncedBatchNorm(axis_name="batch"), variables, clean_set)
    _purify(defense, SyncedBatchNorm(), variables, clean_set)  # the clone without it runs


class TemperedHead(nn.Module):
    """Sows its head's inputs as fippure's models do, but divides the head's output by a
    temperature: the head's outputs are not the logits."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = _trunk(x, nn.BatchNorm(use_running_average=not train))
        self.sow("intermediates", FEATURES, features)
        return nn.Dense(10, name="head")(features) / 4.0


class FeatureAxesHead(nn.Module):
    """A DenseGeneral head over two feature axes (a 3-D kernel)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        x = x.mean(1)  # (n, w, 4)
        self.sow("intermediates", FEATURES, x)
        return nn.DenseGeneral(10, axis=(-2, -1), name="head")(x)


def test_ngf_refuses_a_dense_solve_whose_head_is_not_the_last_layer(clean_set):
    """The dense solver had silently minimised the cross-entropy of head/4's inputs' map as
    if it were the model's (its loss fell while the model's hardly moved)."""
    variables = _variables(TemperedHead(), clean_set)
    with pytest.raises(InvalidInputError, match="head's outputs are not the model's logits"):
        _purify("ngf", TemperedHead(), variables, clean_set)
    config = make_config("ngf", {"steps": "2", "batch_size": "8", "solver": "cg"})
    get_defense("ngf").purify(
        TemperedHead(), variables, clean_set, config, jax.random.key(0), progress=False
    )


def test_ngf_trains_a_head_with_a_3d_kernel_by_conjugate_gradient(clean_set):
    """The automatic solver chose the dense one by the name alone and failed in a matmul."""
    variables = _variables(FeatureAxesHead(), clean_set)
    purified, report = _purify("ngf", FeatureAxesHead(), variables, clean_set)
    assert report.extra["solver"] == "cg"
    assert purified["params"]["head"]["kernel"].shape == (8, 4, 10)


class ScalelessBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = nn.BatchNorm(use_running_average=not train, use_scale=False, name="bn")
        return nn.Dense(10, name="head")(_trunk(x, bn))


def test_nft_names_batchnorms_it_cannot_mask():
    """Its message had said the model had no BatchNorm ("none")."""
    clean = _digits_clean_set()
    variables = _variables(ScalelessBatchNorm(), clean)
    with pytest.raises(InvalidInputError, match=r"bn keep batch_stats without both \(use_scale"):
        _purify("nft", ScalelessBatchNorm(), variables, clean)


def test_variables_with_recorded_intermediates_say_how_to_drop_them():
    """model.init(..., mutable=True) of a model that sows returns its intermediates too."""
    clean = _digits_clean_set()
    probe = jnp.zeros((1, *clean.spec.image_shape))
    variables = TemperedHead().init(jax.random.key(0), probe, mutable=True)
    assert "intermediates" in variables
    with pytest.raises(InvalidInputError, match="intermediates are outputs that model.init"):
        _purify("ft", TemperedHead(), variables, clean)


class HandMadeWeights(nn.Module):
    """A weight matrix made with self.param, not named kernel."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = _trunk(x, nn.BatchNorm(use_running_average=not train))
        w = self.param("w", nn.initializers.lecun_normal(), (4, 10))
        return features @ w + nn.Dense(10, name="head")(features)


def test_fast_fip_reports_the_weights_its_pattern_left_out(clean_set):
    """Fast FIP shifts the singular values of kernels only; 'w' had been left out unseen."""
    variables = _variables(HandMadeWeights(), clean_set)
    _, report = _purify("fast_fip", HandMadeWeights(), variables, clean_set)
    assert report.extra["kernels_left_out"] == ["w"]
    _, report = _purify(
        "fast_fip", TemperedHead(), _variables(TemperedHead(), clean_set), clean_set
    )
    assert report.extra["kernels_left_out"] == []


class BlocksNamedOutOfOrder(nn.Module):
    """Three BatchNorm blocks called z_first, m_second, a_third: their names sort backwards."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for name in ("z_first", "m_second", "a_third"):
            x = nn.Conv(4, (3, 3), name=f"{name}_conv")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=name)(x))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def test_nft_counts_its_layers_in_the_order_the_network_calls_them(clean_set):
    """SPEC section 4's mu(l) decays with depth; the natural sort of the names had given the
    first block the last floor. A large step drives masks onto their floors."""
    from fippure.models import module_call_order
    from fippure.optim.masks import mask_floor

    model = BlocksNamedOutOfOrder()
    variables = _variables(model, clean_set)
    order = module_call_order(model, variables, clean_set.spec.image_shape)
    assert [p for p in order if p[0] in ("z_first", "m_second", "a_third")] == [
        ("z_first",),
        ("m_second",),
        ("a_third",),
    ]
    overrides = {"steps": "3", "batch_size": "8", "mask_pattern": "first|second|third$",
                 "learning_rate": "1000"}  # fmt: skip
    config = make_config("nft", overrides)
    _, report = get_defense("nft").purify(
        model, variables, clean_set, config, jax.random.key(0), progress=False
    )
    masks = report.artifacts["masks"]
    for depth, name in enumerate(("z_first", "m_second", "a_third"), start=1):
        assert float(masks[name].min()) == pytest.approx(mask_floor(depth), rel=1e-6), name


class WithDropout(nn.Module):
    """Dropout before a BatchNorm and before the head, as in a VGG's classifier (BackdoorBench's
    VGG-19-BN has two); ``rate=0`` is the same network without it."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.rate, deterministic=not train)(nn.Conv(4, (3, 3))(x))
        features = nn.relu(nn.BatchNorm(use_running_average=not train)(x)).mean((1, 2))
        self.sow("intermediates", FEATURES, features)
        return nn.Dense(10, name="head")(nn.Dropout(self.rate, deterministic=not train)(features))


def _leaves(variables):
    return jax.tree_util.tree_leaves(variables)


@pytest.mark.parametrize("defense", DEFENSES)
def test_a_model_with_dropout_is_purified_with_dropout_on_in_train_mode(clean_set, defense):
    """Every defense had refused a model with Dropout (no 'dropout' stream). The train-mode
    steps now drop, on a stream folded from the step's key: the run differs from the same
    network without Dropout and repeats under the same key. NGF runs the model in eval mode,
    where Dropout is the identity."""
    variables = _variables(WithDropout(), clean_set)
    dropped, _ = _purify(defense, WithDropout(), variables, clean_set)
    again, _ = _purify(defense, WithDropout(), variables, clean_set)
    without, _ = _purify(defense, WithDropout(rate=0.0), variables, clean_set)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _leaves(dropped))
    jax.tree_util.tree_map(np.testing.assert_array_equal, dropped, again)
    same = all(
        np.array_equal(a, b) for a, b in zip(_leaves(dropped), _leaves(without), strict=True)
    )
    assert same == (defense == "ngf")


@pytest.mark.parametrize("defense", ["ft", "nft"])
def test_dropout_is_off_when_the_defense_runs_the_model_in_eval_mode(clean_set, defense):
    variables = _variables(WithDropout(), clean_set)
    config = make_config(
        defense,
        {"steps": "2", "batch_size": "8", "bn_train": "false"}
        | ({"mask_pattern": "BatchNorm_0"} if defense == "nft" else {}),
    )
    runs = [
        get_defense(defense).purify(
            model, variables, clean_set, config, jax.random.key(0), progress=False
        )[0]
        for model in (WithDropout(), WithDropout(rate=0.0))
    ]
    jax.tree_util.tree_map(np.testing.assert_array_equal, *runs)


def test_recomputed_batch_statistics_see_the_dropout_of_training(clean_set):
    from fippure.purify import recompute_batch_stats

    variables = _variables(WithDropout(), clean_set)
    key = jax.random.key(1)
    dropped = recompute_batch_stats(WithDropout(), variables, clean_set, key, batches=3)
    without = recompute_batch_stats(WithDropout(rate=0.0), variables, clean_set, key, batches=3)
    var = dropped["batch_stats"]["BatchNorm_0"]["var"]
    assert bool(jnp.all(jnp.isfinite(var)))
    # inverted dropout at rate 1/2 scales kept activations by 2: the variance grows
    assert float(var.mean()) > 1.5 * float(without["batch_stats"]["BatchNorm_0"]["var"].mean())


def test_training_a_model_with_dropout_drops(clean_set):
    from fippure.training import TrainConfig, train

    variables = _variables(WithDropout(), clean_set)
    config = TrainConfig(epochs=1, batch_size=8, learning_rate=0.1, augment=False)
    dropped, _ = train(WithDropout(), clean_set, config, variables=variables, progress=False)
    without, _ = train(WithDropout(0.0), clean_set, config, variables=variables, progress=False)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in _leaves(dropped))
    assert not np.array_equal(
        dropped["params"]["head"]["kernel"], without["params"]["head"]["kernel"]
    )


def test_ngf_dense_solver_takes_a_bfloat16_model(digits_badnets):
    """The head check compared an eager pass with a jitted one at float32's tolerance and
    refused the trained model's bfloat16 variables, whose head is the last layer, as 'not the
    model's logits'. It now reads the features and the logits from one pass, at the
    variables' precision."""
    b = digits_badnets
    low = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), b.variables)
    purified, report = _purify("ngf", b.model, low, b.clean)
    assert report.extra["solver"] == "dense"
    assert {x.dtype for x in _leaves(purified)} == {jnp.dtype(jnp.bfloat16)}


def test_a_five_argument_apply_tunable_still_works(clean_set):
    """fisher_guided_purify's apply_tunable took (t, frozen, stats, x, train) before the key
    for Dropout was added; such a callable had failed with a TypeError. It is called without
    the key and gives the default's result."""
    from fippure.purify.common import apply_model
    from fippure.purify.fip import FIPConfig, fisher_guided_purify

    model = WithDropout(rate=0.0)
    variables = _variables(model, clean_set)

    def five_arguments(t, frozen, stats, x, train):
        return apply_model(model, t, stats, x, train)

    runs = [
        fisher_guided_purify(
            model,
            variables,
            clean_set,
            FIPConfig(steps=2, batch_size=8),
            jax.random.key(0),
            tunable=variables["params"],
            to_params=lambda t, f: t,
            apply_tunable=apply,
            method="fip",
            progress=False,
        )[0]  # fmt: skip
        for apply in (five_arguments, None)
    ]
    jax.tree_util.tree_map(np.testing.assert_array_equal, *runs)


def test_train_mode_introspection_takes_the_dropout_key(clean_set):
    """forward, penultimate_features, features_and_logits and activations in train mode had
    no way to give a Dropout model its stream (InvalidRngError)."""
    from fippure.models import activations, forward, penultimate_features
    from fippure.models.registry import features_and_logits

    model = WithDropout()
    variables = _variables(model, clean_set)
    x = jnp.ones((4, *clean_set.spec.image_shape))
    key = jax.random.key(0)
    logits, _ = forward(model, variables, x, True, key)
    features, output = features_and_logits(model, variables, x, True, key)
    np.testing.assert_array_equal(output, logits)
    np.testing.assert_array_equal(penultimate_features(model, variables, x, True, key), features)
    np.testing.assert_array_equal(activations(model, variables, x, train=True, key=key)[0], logits)
    other, _ = forward(model, variables, x, True, jax.random.key(1))
    assert not np.array_equal(other, logits)  # the key draws the masks
