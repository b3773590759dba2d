"""Every step loop hands its compiled step device values only: within
``guard_step_transfers("disallow")`` a host upload inside a step loop raises, and each of
fippure's loops (training, joint attack training, the attack fits, CLB's PGD, Lanczos and power
iteration) runs to the end. The defenses' loop is checked in ``purify/test_compiled_steps.py``.

On the CPU, JAX guards host-to-device transfers only; ``experiments/accelerator_check.py`` runs
the same loops on a GPU, where fetches back to the host are guarded too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attack_fits import CLB, ISSBA, LF, poisoned_context, untrained_reference
from jax.tree_util import Partial

from fippure.attacks import make_attack
from fippure.attacks.joint import Phase, run_phases, unit_batch
from fippure.curvature import eigenvalues
from fippure.data import load_dataset
from fippure.errors import InvalidInputError
from fippure.purify.common import run_steps
from fippure.step_inputs import guard_step_transfers
from fippure.training import TrainConfig, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def small_cnn(digits):
    return untrained_reference(digits)


def test_a_step_given_a_host_value_fails_under_the_guard():
    step = jax.jit(lambda carry, key, scale: (carry * scale, {"loss": carry}))
    carry = jnp.ones(())

    def host_step(c, key):
        return step(c, key, np.float32(2.0))  # a NumPy scalar: uploaded at every step

    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        with guard_step_transfers("disallow"):
            run_steps(host_step, carry, steps=3, key=jax.random.key(0), desc="t", progress=False)
    # outside the guard (and with "log") the same loop runs
    run_steps(host_step, carry, steps=3, key=jax.random.key(0), desc="t", progress=False)
    with guard_step_transfers("log"):
        run_steps(host_step, carry, steps=3, key=jax.random.key(0), desc="t", progress=False)


def test_unknown_guard_level_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="transfer-guard level 'never'"):
        with guard_step_transfers("never"):
            pass


def test_training_steps_take_device_inputs_only(digits, small_cnn):
    model, variables = small_cnn
    config = TrainConfig(epochs=2, batch_size=256, learning_rate=0.05, log_every=2)
    with guard_step_transfers("disallow"):
        final, report = train(model, digits, config, variables=variables, progress=False)
    assert report.steps == 2 * (len(digits) // 256)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(final))


def test_joint_attack_phases_take_device_inputs_only(digits):
    @jax.jit
    def step(carry, images, labels, permutation, index, key):
        x, _, _ = unit_batch(images, labels, permutation, index, 128)
        value = jnp.mean(x) + 0.01 * jax.random.normal(key, ())
        return carry + value, {"loss": value}

    phases = [Phase("generator", 1, step, trains_classifier=False), Phase("joint", 1, step)]
    with guard_step_transfers("disallow"):
        carry, report = run_phases(
            phases, jnp.zeros(()), digits, batch_size=128, seed=0, fingerprint={}, progress=False
        )
    assert report.steps == 2 * (len(digits) // 128)


@pytest.mark.parametrize(
    ("name", "options", "clean_label"),
    [
        ("issba", {**ISSBA, "fit_steps": 6}, False),
        ("lf", {**LF, "steps": 6}, False),
        ("clb", {**CLB, "steps": 2}, True),
    ],
)
@pytest.mark.parametrize("weights", ["device", "numpy"])
def test_attack_fits_take_device_inputs_only(
    digits, small_cnn, name, options, clean_label, weights
):
    # NumPy reference weights (as flax.serialization restores them) were uploaded by LF's
    # fit at every step
    attack = make_attack(name, **options)
    model, variables = small_cnn
    if weights == "numpy":
        variables = jax.tree_util.tree_map(np.asarray, variables)
    context = poisoned_context(digits, (model, variables), clean_label=clean_label)
    state = attack.init_state(jax.random.key(1), context.spec)
    with guard_step_transfers("disallow"):
        fitted = attack.fit(state, context)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(fitted))


def _apply(matrix, v):
    return {"w": matrix @ v["w"]}


def test_lanczos_and_power_iteration_steps_take_device_inputs_only():
    a = jax.random.normal(jax.random.key(0), (6, 6))
    operator = Partial(_apply, a @ a.T)
    start = {"w": jnp.ones(6)}
    with guard_step_transfers("disallow"):
        tridiagonal = eigenvalues.lanczos(operator, start, jax.random.key(1), 4)
        result = eigenvalues.power_iteration(operator, start, jax.random.key(2), 5, tol=0.0)
    assert tridiagonal.alphas.shape == (4,)
    assert np.isfinite(float(result.eigenvalue))
