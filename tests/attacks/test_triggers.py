"""Properties every trigger must have: shape, [0, 1] range, determinism, jit, small state that
round-trips through a checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fippure.attacks import ATTACKS, apply_trigger, make_attack
from fippure.checkpoints import load_checkpoint, model_metadata, save_checkpoint
from fippure.data.catalog import get_spec
from fippure.errors import InvalidInputError, UnknownNameError
from fippure.models.registry import create_model, init_variables

# Attacks with a closed-form trigger (the learned ones are tested in their own modules).
NAMES = ("badnets", "blend", "trojan", "sig", "wanet", "bpp", "lf", "ftrojan")
DATASETS = ("cifar10", "digits")


def _images(shape, n=6, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, *shape), jnp.float32)


def _state(attack, spec):
    state = attack.init_state(jax.random.key(3), spec)
    if attack.name == "lf":  # fit needs a model; a fixed smooth pattern stands in for it
        h, w, c = spec.image_shape
        coarse = jax.random.uniform(jax.random.key(4), attack.coarse_shape((h, w, c)), minval=-1)
        state = {"pattern": attack.expand(attack.eps * coarse, h, w)}
    return state


def test_registry_holds_every_attack():
    assert set(NAMES) <= set(ATTACKS)
    for name in NAMES:
        assert make_attack(name).name == name


def test_unknown_attack_and_option_are_one_line_errors():
    with pytest.raises(UnknownNameError, match="unknown attack 'wanett'.*Did you mean 'wanet'"):
        make_attack("wanett")
    with pytest.raises(InvalidInputError, match="attack sig has no option"):
        make_attack("sig", alpha=0.1)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("blend", {"alpha": 1.5}, r"Blend.alpha must be in \(0, 1\], got 1.5"),
        ("badnets", {"size": 0}, "BadNets.size must be >= 1, got 0"),
        ("badnets", {"size": 2.5}, "BadNets.size must be an integer, got 2.5"),
        ("sig", {"frequency": 0}, "SIG.frequency must be > 0, got 0"),
        ("wanet", {"k": 3.5}, "WaNet.k must be an integer, got 3.5"),
        ("wanet", {"k": 1}, "WaNet.k must be >= 2, got 1"),
        ("bpp", {"squeeze_num": 300}, r"BPP.squeeze_num must be in \[2, 256\], got 300"),
        ("clb", {"eps": 0.5}, r"CLB.eps must be in \[0, 0.5\), got 0.5"),
        ("input_aware", {"generator_schedule": "step"}, "InputAware.generator_schedule must be"),
        ("lira", {"generator_lr": 0.0}, "LIRA.generator_lr must be > 0, got 0.0"),
        ("issba", {"ramp_fraction": 2.0}, r"ISSBA.ramp_fraction must be in \[0, 1\], got 2.0"),
        ("lf", {"factor": 0}, "LF.factor must be >= 1, got 0"),
        ("lf", {"steps": 0}, "LF.steps must be >= 1, got 0"),
        ("ftrojan", {"window": 0}, "FTrojan.window must be >= 1, got 0"),
    ],
)
def test_out_of_range_or_mistyped_options_are_one_line_errors(name, options, message):
    with pytest.raises(InvalidInputError, match=message):
        make_attack(name, **options)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", NAMES)
def test_trigger_keeps_shape_range_and_is_deterministic_and_jittable(name, dataset):
    spec = get_spec(dataset)
    attack = make_attack(name)
    if name == "trojan" and dataset == "digits":
        attack = make_attack(name, size=3)
    state = _state(attack, spec)
    images = _images(spec.image_shape)
    key = jax.random.key(1)
    run = jax.jit(attack.trigger)
    out = run(state, images, key)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(jnp.abs(out - images).max()) > 1e-3  # the trigger does something
    np.testing.assert_array_equal(np.asarray(run(state, images, key)), np.asarray(out))
    # uint8 images through the batched helper: the same result as the trigger on [0, 1]
    uint8 = np.asarray(np.round(images * 255), np.uint8)
    batched = apply_trigger(attack, state, uint8, key, batch_size=len(uint8))
    assert batched.dtype == np.float32 and batched.shape == images.shape
    direct = run(state, jnp.asarray(uint8, jnp.float32) / 255.0, jax.random.fold_in(key, 0))
    np.testing.assert_allclose(batched, np.asarray(direct), atol=1e-6)
    # uint8 images straight into the trigger are scaled to [0, 1] first, as documented
    from_uint8 = run(state, jnp.asarray(uint8), key)
    assert from_uint8.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(from_uint8),
        np.asarray(run(state, jnp.asarray(uint8, jnp.float32) / 255.0, key)),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), r"expects a \(batch, height, width, channels\)"),
        (np.zeros((1, 32, 32, 3), bool), "got dtype bool"),
    ],
)
def test_trigger_refuses_unbatched_or_non_numeric_images(images, message):
    with pytest.raises(InvalidInputError, match=message):
        make_attack("badnets").trigger({}, images, None)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_small_and_seeded(name):
    spec = get_spec("cifar10")
    attack = make_attack(name)
    state = attack.init_state(jax.random.key(0), spec)
    size = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(state))
    assert size < 100_000
    same = attack.init_state(jax.random.key(0), spec)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, same)


def test_states_round_trip_through_checkpoint(tmp_path):
    spec = get_spec("cifar10")
    attacks = {name: make_attack(name) for name in NAMES}
    states = {name: _state(attack, spec) for name, attack in attacks.items()}
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    metadata = {
        "model": model_metadata("small_cnn", 10, width=4),
        "image_shape": [32, 32, 3],
        "attacks": {name: attack.options() for name, attack in attacks.items()},
    }
    save_checkpoint(tmp_path / "ckpt", variables, metadata, extras=states)
    loaded = load_checkpoint(tmp_path / "ckpt")
    images = _images(spec.image_shape)
    for name, attack in attacks.items():
        state = states[name]
        restored = loaded.extras.get(name, {})  # stateless attacks store nothing
        assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
        jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
        rebuilt = make_attack(name, **loaded.metadata["attacks"][name])
        assert rebuilt == attack
        run = jax.jit(rebuilt.trigger)
        np.testing.assert_array_equal(
            np.asarray(run(restored, images, jax.random.key(0))),
            np.asarray(run(state, images, jax.random.key(0))),
        )


def test_apply_trigger_refuses_float_pixels_on_the_0_255_scale():
    attack = make_attack("badnets")
    images = np.full((2, 32, 32, 3), 128.0, np.float32)
    with pytest.raises(InvalidInputError, match=r"read as \[0, 1\] but these span \[128, 128\]"):
        apply_trigger(attack, {}, images, jax.random.key(0))
    triggered = apply_trigger(attack, {}, images.astype(np.uint8), jax.random.key(0))
    assert triggered.max() <= 1.0 and np.isclose(triggered[0, 0, 0, 0], 128 / 255)


@pytest.mark.parametrize(
    "images",
    [
        np.full((2, 32, 32, 3), 128.0, np.float32),  # 0-255 values as floats
        np.full((2, 32, 32, 3), -0.4, np.float32),  # normalised images
        np.full((2, 32, 32, 3), 300, np.int32),  # not pixels
    ],
    ids=["float_0_255", "normalised", "int_above_255"],
)
def test_an_eager_trigger_refuses_pixels_outside_their_range_as_apply_trigger_does(images):
    """BadNets on 0-255 floats had returned values up to 255, and WaNet all ones."""
    for name in ("badnets", "blend", "wanet"):
        attack = make_attack(name)
        state = attack.init_state(jax.random.key(0), get_spec("cifar10"))
        with pytest.raises(InvalidInputError, match=f"{name} trigger: .* images are read as"):
            attack.trigger(state, images, jax.random.key(0))
        with pytest.raises(InvalidInputError, match="apply_trigger: .* images are read as"):
            apply_trigger(attack, state, images, jax.random.key(0))


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("shape", [(64, 64, 3), (32, 32, 1), (16, 20, 3)], ids=str)
def test_a_state_made_for_other_images_is_refused_or_fits(name, shape):
    """A CIFAR-10 state on other images: the trigger keeps the images' shape, or says in one
    line that the state does not fit (WaNet had returned 32x32 images for 64x64 ones)."""
    attack = make_attack(name)
    state = attack.init_state(jax.random.key(0), get_spec("cifar10"))
    images = _images(shape, n=2)
    for run in (attack.trigger, jax.jit(attack.trigger)):
        try:
            out = run(state, images, jax.random.key(0))
        except InvalidInputError:  # "does not fit", a patch or window that does not tile...
            continue
        else:
            assert out.shape == images.shape


def test_apply_trigger_refuses_a_zero_batch_and_an_untyped_key():
    attack, images = make_attack("badnets"), np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="batch_size must be an integer >= 1, got 0"):
        apply_trigger(attack, {}, images, jax.random.key(0), batch_size=0)
    with pytest.raises(InvalidInputError, match=r"typed key \(jax.random.key\(seed\)\), got int"):
        apply_trigger(attack, {}, images, 0)


def test_a_wanet_field_finer_than_the_image_is_refused():
    with pytest.raises(InvalidInputError, match="wanet k=40 exceeds the 32x32 image"):
        make_attack("wanet", k=40).init_state(jax.random.key(0), get_spec("cifar10"))


@pytest.mark.parametrize("name", [*NAMES, "input_aware", "lira", "issba"])
def test_low_precision_images_keep_their_dtype_and_their_trigger(name):
    spec = get_spec("cifar10")
    attack = make_attack(name, s=0.0) if name == "wanet" else make_attack(name)
    state = attack.init_state(jax.random.key(0), spec)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)) / 255)
    images = images.astype(jnp.bfloat16)
    low = attack.trigger(state, images, jax.random.key(1))
    assert low.dtype == jnp.bfloat16
    full = attack.trigger(state, images.astype(jnp.float32), jax.random.key(1))  # same values
    # a bfloat16 sampling grid once moved WaNet's pixels (s = 0) by up to 38 grey levels;
    # BPP's levels and FTrojan's DCT, computed in bfloat16, were off too
    assert float(jnp.abs(low.astype(jnp.float32) - full).max()) < 1.5 / 255


def test_a_sweep_over_a_triggers_setting_keeps_only_recent_compiled_triggers():
    """apply_trigger jits each attack configuration's trigger once; a process sweeping a
    blend ratio over 40 values once kept all 40, and their compiled programs, until exit."""
    from fippure.attacks.base import _jitted_trigger

    spec = get_spec("cifar10")
    images = np.zeros((1, *spec.image_shape), np.uint8)
    seen = []
    for alpha in np.linspace(0.05, 0.95, 40):
        attack = make_attack("blend", alpha=float(alpha))
        state = attack.init_state(jax.random.key(0), spec)
        triggered = apply_trigger(attack, state, images, jax.random.key(0))
        seen.append(float(triggered.max()))
    assert len(set(seen)) == 40  # every ratio was applied
    assert _jitted_trigger.cache_info().currsize <= 32
