"""Fast FIP's layers: attention kernels decomposed with their input axes, the factored kernel
form, and the saved spectral shifts."""

from __future__ import annotations

import contextlib

import jax
import pytest
from clean_sets import random_digits_clean_set

from fippure.models import create_model, init_variables
from fippure.optim.spectral import decompose, layer_input_axes, num_shifts
from fippure.purify import fast_fip, fip


def test_fast_fip_shifts_the_singular_values_of_each_attention_layers_map():
    clean = random_digits_clean_set(per_class=2)
    model = create_model("vit_small", 10, width=8, depth=1, num_heads=2, patch_size=4)
    variables = init_variables(model, jax.random.key(0), clean.spec.image_shape)
    config = fast_fip.FastFIPConfig(steps=1, batch_size=10, eta_F=0.0, log_every=1)
    _, report = fast_fip.purify(model, variables, clean, config, 0, progress=False)
    axes = layer_input_axes(model, variables, clean.spec.image_shape)
    want = num_shifts(decompose(variables["params"], input_axes=axes))
    assert want != num_shifts(decompose(variables["params"]))  # the layouts differ here
    assert report.tunable_parameters == want


@pytest.fixture
def retraced_fip():
    for fn in (fip._fip_step, fip._trace_estimate):
        fn.clear_cache()
    yield
    for fn in (fip._fip_step, fip._trace_estimate):
        fn.clear_cache()


@pytest.mark.parametrize("form, entered", [("factored", True), ("rebuilt", False)])
def test_kernel_form_chooses_whether_the_steps_run_the_layers_factored(
    monkeypatch, retraced_fip, form, entered
):
    clean = random_digits_clean_set(per_class=2)
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(1), clean.spec.image_shape)
    calls = []
    real = fast_fip.factored

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        calls.append(1)
        with real(*args, **kwargs):
            yield

    monkeypatch.setattr(fast_fip, "factored", counting)
    config = fast_fip.FastFIPConfig(steps=1, batch_size=10, kernel_form=form, log_every=1)
    fast_fip.purify(model, variables, clean, config, 0, progress=False)
    assert bool(calls) is entered


def test_with_tuned_batchnorm_the_saved_shifts_are_the_shifts_alone():
    from fippure.optim.spectral import init_shifts

    clean = random_digits_clean_set(per_class=2)
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(1), clean.spec.image_shape)
    config = fast_fip.FastFIPConfig(steps=1, batch_size=10, tune_bn_affine=True, log_every=1)
    _, report = fast_fip.purify(model, variables, clean, config, 0, progress=False)
    shifts = report.artifacts["spectral_shifts"]
    want = init_shifts(decompose(variables["params"]))
    assert jax.tree_util.tree_structure(shifts) == jax.tree_util.tree_structure(want)
    assert "bn_affine" not in shifts
