"""Per-step loop inputs made on the device ahead equal the per-step host computations."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fippure.step_inputs import device_indices, folded_keys, sum_metrics


@pytest.mark.parametrize(("start", "stop"), [(0, 5), (7, 600), (300, 301)])
def test_folded_keys_are_fold_in_of_each_step(start, stop):
    key = jax.random.key(5)
    keys = list(folded_keys(key, start, stop, chunk=256))
    assert len(keys) == stop - start
    for t in sorted({start, start + 1, 255, 256, stop - 1} & set(range(start, stop))):
        np.testing.assert_array_equal(
            jax.random.key_data(keys[t - start]), jax.random.key_data(jax.random.fold_in(key, t))
        )


def test_folded_keys_take_raw_uint32_keys_too():
    key = jax.random.PRNGKey(3)
    (first,) = folded_keys(key, 9, 10)
    np.testing.assert_array_equal(first, jax.random.fold_in(key, 9))


def test_device_indices_count_steps_or_batches_of_the_epoch():
    assert [int(i) for i in device_indices(3, 9, chunk=4)] == [3, 4, 5, 6, 7, 8]
    assert [int(i) for i in device_indices(3, 9, modulus=4, chunk=4)] == [3, 0, 1, 2, 3, 0]
    assert all(i.dtype == np.int32 and i.shape == () for i in device_indices(0, 3))


def test_sum_metrics_totals_each_key():
    entries = [{"loss": np.float32(v), "accuracy": np.float32(v / 10)} for v in (1.0, 2.0, 4.5)]
    totals = sum_metrics(entries)
    assert float(totals["loss"]) == pytest.approx(7.5)
    assert float(totals["accuracy"]) == pytest.approx(0.75)


def test_another_run_length_compiles_nothing_new(programs_compiled):
    """Each chunk is computed whole and cut on the host: a sweep over ``steps`` once compiled
    the key and index programs again for every new length."""
    key = jax.random.key(3)
    list(folded_keys(key, 0, 7, chunk=16))
    list(device_indices(0, 7, chunk=16))
    with programs_compiled() as compiled:
        keys = list(folded_keys(key, 2, 11, chunk=16))
        indices = [int(i) for i in device_indices(5, 9, chunk=16)]
    assert not compiled, compiled
    assert len(keys) == 9 and indices == [5, 6, 7, 8]
    np.testing.assert_array_equal(
        jax.random.key_data(keys[0]), jax.random.key_data(jax.random.fold_in(key, 2))
    )
