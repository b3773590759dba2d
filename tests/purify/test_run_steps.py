"""The purification step loop (run_steps): which steps its loss curve logs, how it times steps,
and the clean batch size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from clean_sets import random_digits_clean_set

from fippure.errors import InvalidInputError
from fippure.purify.common import StopEarly, clean_batch_size, run_steps


def _count(carry, key):
    del key
    return carry + 1.0, {"loss": carry}


def test_the_loss_curve_logs_the_first_every_log_every_th_and_the_last_step():
    run = run_steps(
        _count, jnp.zeros(()), steps=5, key=jax.random.key(0), desc="t", progress=False, log_every=2
    )
    assert [p["step"] for p in run.loss_curve] == [1, 2, 4, 5]
    assert [p["loss"] for p in run.loss_curve] == [0.0, 1.0, 3.0, 4.0]


def test_the_median_step_time_leaves_out_the_first_step(monkeypatch):
    """The first step includes compilation; the median must not. A fake clock: the first step
    takes 100 s, the second 1 s."""
    import types

    from fippure.purify import common

    clock = [0.0]
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def step(carry, key):
        clock[0] += 100.0 if clock[0] == 0.0 else 1.0
        return _count(carry, key)

    run = run_steps(
        step, jnp.zeros(()), steps=2, key=jax.random.key(0), desc="t", progress=False, log_every=1
    )
    assert run.step_time_s == 1.0


def test_a_stop_at_a_logged_step_logs_that_step_once():
    def stop(step, variables):
        raise StopEarly

    run = run_steps(
        _count,
        jnp.zeros(()),
        steps=6,
        key=jax.random.key(0),
        desc="t",
        progress=False,
        log_every=2,
        observer=stop,
        observe_every=2,
        to_variables=lambda c: {"params": c},
    )
    assert run.steps_done == 2
    assert [p["step"] for p in run.loss_curve] == [1, 2]


def test_a_clean_batch_of_no_images_is_refused():
    clean = random_digits_clean_set(per_class=1)
    assert clean_batch_size(1, clean) == 1
    assert clean_batch_size(64, clean) == len(clean)
    with pytest.raises(InvalidInputError, match="batch_size must be positive"):
        clean_batch_size(0, clean)
