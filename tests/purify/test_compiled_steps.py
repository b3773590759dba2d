"""The defenses' compiled steps: weights, factors and statistics enter as arguments (never as
constants baked into the program), every step input is already on the device (no upload per
step), and donating the carry never touches the caller's arrays."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clean_sets import random_digits_clean_set

from fippure.models import create_model, init_variables, with_dtype
from fippure.purify import batch_stats, registry
from fippure.purify.common import clean_batch_size
from fippure.step_inputs import guard_step_transfers

#: Every defense, a few steps, on a model whose smallest weight array is well above the limit.
SETTINGS = {
    "fip": {"trace_every": 2, "average_last": 2, "final_batch_stats": "transfer"},
    "fast_fip": {"trace_every": 2},
    "nft": {"mask_pattern": r"^bn\d+$", "final_batch_stats": "recompute"},
    "ngf": {},
    "ngf_cg": {"solver": "cg", "layer": "conv2", "kl_clip": 0.1},
    "ft": {"final_batch_stats": "transfer"},
    "ft_sam": {},
}
LIMIT = 512  # bytes: more than the normalisation constants, less than any weight array


@pytest.fixture(scope="module")
def model_and_data():
    clean = random_digits_clean_set(per_class=4)
    model = create_model("small_cnn", 10, width=16)
    variables = init_variables(model, jax.random.key(2), clean.spec.image_shape)
    smallest = min(x.nbytes for x in jax.tree_util.tree_leaves(variables["params"]) if x.ndim > 1)
    assert smallest > LIMIT
    return model, variables, clean


def _purify_guarded(name, model, variables, clean):
    """A few steps of defense ``name`` (a key of SETTINGS), failing on a step that uploads a
    host value or on weights captured as constants; returns the purified variables."""
    method = name.removesuffix("_cg")
    config = registry.make_config(
        method, {"steps": 4, "batch_size": 16, "log_every": 2, **SETTINGS[name]}
    )
    previous = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", LIMIT)
    try:
        with warnings.catch_warnings(), guard_step_transfers("disallow"):
            warnings.filterwarnings("error", message=".*constants were captured")
            purified, _ = registry.get_defense(method).purify(
                model, variables, clean, config, jax.random.key(0), progress=False
            )
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", previous)
    return purified


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_defense_steps_capture_no_weights_upload_nothing_and_keep_the_callers_arrays(
    model_and_data, name, dtype
):
    """Also with the model computing in bfloat16: every defense then keeps float32 weights."""
    model, variables, clean = model_and_data
    model = with_dtype(model, dtype)
    # device arrays, so that a donated buffer of the caller's would show as deleted
    variables = jax.tree_util.tree_map(jnp.array, variables)
    batch_stats._mean_batch_statistics.cache_clear()
    purified = _purify_guarded(name, model, variables, clean)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(variables))
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(purified))
    assert {x.dtype for x in jax.tree_util.tree_leaves(purified)} == {jnp.dtype("float32")}


# ngf_cg puts its variables on the device as ngf does, and its unoptimised steps take 5 s
@pytest.mark.parametrize("name", sorted(set(SETTINGS) - {"ngf_cg"}))
def test_defense_steps_upload_nothing_when_the_variables_are_numpy_arrays(model_and_data, name):
    """Variables as ``flax.serialization`` restores them (host NumPy arrays) are put on the
    device once, not uploaded again by every step that takes the weights as an argument."""
    model, variables, clean = model_and_data
    host = jax.tree_util.tree_map(np.asarray, variables)
    purified = _purify_guarded(name, model, host, clean)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(purified))


def test_a_transfer_compiles_one_batch_statistics_estimate(model_and_data):
    model, variables, clean = model_and_data
    batch_stats._mean_batch_statistics.cache_clear()
    moved = jax.tree_util.tree_map(lambda x: x * 1.01, variables["params"])
    purified = {**variables, "params": moved}
    batch_stats.transfer_batch_stats(model, variables, purified, clean, jax.random.key(0))
    batch_stats.recompute_batch_stats(model, purified, clean, jax.random.key(1))
    assert batch_stats._mean_batch_statistics.cache_info().currsize == 1
    size = clean_batch_size(128, clean)
    estimate = batch_stats._mean_batch_statistics(model, clean.spec, size, 20, True)
    assert batch_stats._mean_batch_statistics.cache_info().currsize == 1
    assert estimate._cache_size() == 1


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_second_run_of_a_configuration_compiles_nothing_and_matches_a_fresh_compile(
    model_and_data, name, programs_compiled
):
    """Another seed on another model of the same architecture (several backdoors, or 3 seeds
    of one): every defense's step, and FIP's and Fast FIP's TrF0 estimate and Fbar pass, are
    compiled once per configuration, and the reused programs give what fresh ones give."""
    from fippure.curvature import fisher
    from fippure.purify import fip, ft, nft, ngf

    model, variables, clean = model_and_data
    method = name.removesuffix("_cg")
    config = registry.make_config(
        method, {"steps": 4, "batch_size": 16, "log_every": 2, **SETTINGS[name]}
    )
    defense = registry.get_defense(method)
    defense.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    other = {**variables, "params": jax.tree_util.tree_map(lambda p: 0.9 * p, variables["params"])}
    with programs_compiled() as compiled:
        reused, _ = defense.purify(model, other, clean, config, jax.random.key(1), progress=False)
    assert not compiled, compiled
    shared = (
        fip._fip_step,
        fip._trace_estimate,
        fisher._shared_chunk_squared_gradients,
        ft._ft_step,
        nft._nft_step,
        ngf._ngf_step,
    )
    for fn in shared:
        fn.clear_cache()
    fresh, _ = defense.purify(model, other, clean, config, jax.random.key(1), progress=False)
    for a, b in zip(
        jax.tree_util.tree_leaves(reused), jax.tree_util.tree_leaves(fresh), strict=True
    ):
        np.testing.assert_array_equal(a, b)


#: Per defense, a sweep over the fields its step takes as traced arguments or never reads
#: (``compile_key``): none may compile the step again.
SWEEPS = {
    "fip": {"learning_rate": "0.003", "eta_F": "0.5", "log_every": "4", "stats_batches": "2"},
    "fast_fip": {"learning_rate": "0.003", "eta_F": "0.5", "calibration_probes": "4"},
    "nft": {
        "eta": "0.5",
        "floor_a": "0.5",
        "log_every": "4",
        "learning_rate": "0.03",
        "schedule": "cosine",
    },
    "ngf": {"log_every": "4"},
    "ngf_cg": {"log_every": "4"},
    "ft": {"learning_rate": "0.003", "log_every": "4", "stats_batches": "2"},
    "ft_sam": {"learning_rate": "0.003", "rho": "1.0", "eta": "0.02"},
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_a_hyper_parameter_sweep_compiles_the_step_once(model_and_data, name):
    """A learning-rate or eta_F sweep (and a change of log_every or another field the step
    never reads) reuses the compiled step: those values reach it as traced arguments, not as
    part of its static configuration. The swept values are used: the result changes."""
    from fippure.purify import fip, ft, nft, ngf

    model, variables, clean = model_and_data
    method = name.removesuffix("_cg")
    base = {"steps": 4, "batch_size": 16, "log_every": 2, **SETTINGS[name]}
    defense = registry.get_defense(method)
    first, _ = defense.purify(
        model, variables, clean, registry.make_config(method, base), jax.random.key(0),
        progress=False,
    )  # fmt: skip
    swept = registry.make_config(method, {**base, **SWEEPS[name]})
    steps = (fip._fip_step, ft._ft_step, nft._nft_step, ngf._ngf_step)
    before = [step._cache_size() for step in steps]
    second, _ = defense.purify(model, variables, clean, swept, jax.random.key(0), progress=False)
    assert [step._cache_size() for step in steps] == before
    if method in ("fip", "fast_fip", "ft", "ft_sam", "nft"):  # values that change the iterate
        assert not all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second), strict=True
            )
        )


def test_compile_key_drops_only_the_hoisted_fields():
    from fippure.errors import InvalidInputError
    from fippure.purify.common import compile_key
    from fippure.purify.ft import FTConfig

    a = compile_key(FTConfig(learning_rate=0.1, steps=10), "learning_rate")
    b = compile_key(FTConfig(learning_rate=0.2, steps=10), "learning_rate")
    assert a == b and hash(a) == hash(b) and a.learning_rate is None
    assert compile_key(FTConfig(steps=11), "learning_rate") != a  # other fields still count
    with pytest.raises(InvalidInputError, match="no field learning_rte"):
        compile_key(FTConfig(), "learning_rte")


@pytest.mark.parametrize("name", ["ft", "nft", "fip"])
def test_bfloat16_variables_keep_their_dtypes_and_the_step_compiles_once(model_and_data, name):
    """Flax blends a float32 batch mean into bfloat16 running statistics: they had come back
    float32, and the carry's changed dtype compiled the step a second time after step 1."""
    from fippure.purify import fip, ft, nft

    model, variables, clean = model_and_data
    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables)
    step = {"ft": ft._ft_step, "nft": nft._nft_step, "fip": fip._fip_step}[name]
    before = step._cache_size()
    config = registry.make_config(name, {"steps": 3, "batch_size": 16, **SETTINGS[name]})
    purified, _ = registry.get_defense(name).purify(
        model, low, clean, config, jax.random.key(0), progress=False
    )
    assert {x.dtype for x in jax.tree_util.tree_leaves(purified)} == {jnp.dtype(jnp.bfloat16)}
    assert step._cache_size() == before + 1
