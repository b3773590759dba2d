"""Each defense's update, checked against a hand-written or dense computation on tiny models."""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clean_sets import random_digits_clean_set
from jax.flatten_util import ravel_pytree

from fippure.data import normalize, to_unit_range
from fippure.errors import InvalidInputError
from fippure.models import create_model, init_variables, penultimate_features
from fippure.optim.masks import layer_floors
from fippure.optim.spectral import decompose, init_shifts, num_shifts, rebuild_params
from fippure.purify import fast_fip, fip, ft, nft, ngf
from fippure.purify.common import apply_model
from fippure.purify.fip import trace_term
from fippure.purify.registry import get_defense, make_config


@pytest.fixture(scope="module")
def tiny():
    """A width-4 digits CNN and a 40-image clean set (4 per class)."""
    clean = random_digits_clean_set(per_class=4)
    spec = clean.spec
    model = create_model("small_cnn", 10, width=4)
    variables = init_variables(model, jax.random.key(1), spec.image_shape)
    inputs = normalize(to_unit_range(jnp.asarray(clean.images)), spec)
    return model, variables, clean, inputs, jnp.asarray(clean.labels)


def _per_example_loss(model, variables):
    def loss(params, batch):
        x, y = batch
        logits = model.apply({**variables, "params": params}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fip_steps_are_sgd_on_cross_entropy_plus_the_fisher_anchor(tiny, schedule):
    """Two steps; the cosine schedule halves the second step's learning rate (of 2 steps)."""
    model, variables, clean, inputs, labels = tiny
    lr, eta_r = 0.05, 7.0
    lr2 = lr if schedule == "constant" else lr / 2
    config = fip.FIPConfig(
        steps=2,
        schedule=schedule,
        batch_size=len(clean),
        learning_rate=lr,
        momentum=0.0,
        eta_F=0.0,
        eta_r=eta_r,
        augment=False,
        bn_train=False,
        log_every=1,
    )
    out, report = fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)

    per_example = _per_example_loss(model, variables)

    @jax.jit  # one program: op by op, the reference compiled 270 small ones
    def two_steps(theta0):
        grads = jax.vmap(
            lambda x, y: jax.grad(lambda p: per_example(p, (x[None], y[None]))[0])(theta0)
        )(inputs, labels)
        fisher = jax.tree_util.tree_map(lambda g: jnp.mean(g**2, axis=0), grads)

        def ce_grad(p):
            return jax.grad(lambda q: jnp.mean(per_example(q, (inputs, labels))))(p)

        theta1 = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta0, ce_grad(theta0))
        return jax.tree_util.tree_map(
            lambda p, g, f, p0: p - lr2 * (g + eta_r * f * (p - p0)),
            theta1,
            ce_grad(theta1),
            fisher,
            theta0,
        )

    got, want = ravel_pytree(out["params"])[0], ravel_pytree(two_steps(variables["params"]))[0]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    assert report.tunable_parameters == want.size
    # no trace penalty, so TrF0 is not calibrated
    assert report.extra["trace0"] is None and report.extra["penalty_strength"] == 0.0


@pytest.mark.parametrize("trace_scale", ["absolute", "relative"])
def test_fip_step_descends_cross_entropy_plus_eta_f_times_the_fisher_trace(tiny, trace_scale):
    """SPEC section 2: one step of plain SGD on CE + eta_F * TrF (the exact per-example trace,
    BN in eval mode), with eta_F divided by TrF0 when relative; the anchor is 0 at theta0."""
    model, variables, clean, inputs, labels = tiny
    lr, eta_f = 0.05, 0.3
    config = fip.FIPConfig(
        steps=1,
        batch_size=len(clean),
        learning_rate=lr,
        momentum=0.0,
        eta_F=eta_f,
        eta_r=0.0,
        trace_scale=trace_scale,
        trace_estimator="per_example",
        augment=False,
        bn_train=False,
        log_every=1,
    )
    out, report = fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    per_example = _per_example_loss(model, variables)

    @jax.jit
    def reference(theta0):
        def fisher_trace(p):  # (1/N) sum_i ||grad l_i||^2 over the whole clean set
            grads = jax.vmap(
                lambda x, y: jax.grad(lambda q: per_example(q, (x[None], y[None]))[0])(p)
            )(inputs, labels)
            return sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads)) / len(labels)

        trace0 = fisher_trace(theta0)
        strength = eta_f if trace_scale == "absolute" else eta_f / trace0
        objective = lambda p: (
            jnp.mean(per_example(p, (inputs, labels)))
            + strength
            * (  # noqa: E731
                fisher_trace(p)
            )
        )
        step = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta0, jax.grad(objective)(theta0))
        return step, trace0, strength

    want, trace0, strength = reference(variables["params"])
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )
    assert report.extra["penalty_strength"] == pytest.approx(float(strength), rel=1e-4)
    # the step moved the weights by more than CE alone would: the trace term is in the step
    ce_only = jax.tree_util.tree_map(
        lambda p, g: p - lr * g,
        variables["params"],
        jax.grad(lambda p: jnp.mean(per_example(p, (inputs, labels))))(variables["params"]),
    )
    assert not np.allclose(ravel_pytree(ce_only)[0], ravel_pytree(want)[0], rtol=1e-3, atol=1e-5)


def test_fip_tail_averaging_returns_the_mean_of_the_last_iterates(tiny):
    """``average_last=k`` returns the mean of the last k iterates of the unchanged trajectory
    (the observer sees every iterate but the last, which ``average_last=0`` returns)."""
    model, variables, clean, _, _ = tiny
    base = dict(steps=5, batch_size=16, learning_rate=0.05, eta_F=0.5, calibration_probes=1)
    seen = []
    last, _ = fip.purify(
        model,
        variables,
        clean,
        fip.FIPConfig(**base),
        jax.random.key(3),
        progress=False,
        observer=lambda step, v: seen.append(ravel_pytree(v["params"])[0]),
        observe_every=1,
    )
    averaged, _ = fip.purify(
        model,
        variables,
        clean,
        fip.FIPConfig(**base, average_last=3),
        jax.random.key(3),
        progress=False,
    )
    iterates = [*seen, ravel_pytree(last["params"])[0]]
    assert len(iterates) == 5
    want = np.mean(np.stack(iterates[-3:]), axis=0)
    np.testing.assert_allclose(ravel_pytree(averaged["params"])[0], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, iterates[-1], rtol=1e-4)
    with pytest.raises(InvalidInputError, match="average_last"):
        fip.FIPConfig(steps=5, average_last=6)


@pytest.fixture
def retraced_fip():
    """FIP's compiled steps and TrF0 estimate are shared by every run of a configuration; a
    test that patches a function they call needs them traced afresh, and must not leave its
    patch compiled in for the tests after it."""
    compiled = (fip._fip_step, fip._trace_estimate)
    for fn in compiled:
        fn.clear_cache()
    yield
    for fn in compiled:
        fn.clear_cache()


@pytest.mark.parametrize("variant", ["empirical", "true"])
def test_fip_relative_scale_is_the_same_variants_trace_at_theta0(
    tiny, monkeypatch, retraced_fip, variant
):
    """eta_F is relative to TrF0 of the penalised variant: the true-Fisher penalty is divided
    by the true-Fisher trace at theta0, not by the empirical one."""
    model, variables, clean, _, _ = tiny
    monkeypatch.setattr(fip, "true_fisher_trace", lambda *args, **kwargs: jnp.float32(123.0))
    config = fip.FIPConfig(steps=1, batch_size=16, trace_variant=variant, calibration_probes=2)
    _, report = fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    assert (report.extra["trace0"] == pytest.approx(123.0)) == (variant == "true")
    assert report.extra["penalty_strength"] == pytest.approx(config.eta_F / report.extra["trace0"])


def _record_trace_batches(monkeypatch) -> list:
    """Patches FIP's trace term to record, for every call, the per-example losses it
    penalises and its batch; returns the list the records go to."""
    seen = []

    def spy(variant, per_example_loss, logits_fn, tunable, batch, key, *options):
        record = lambda *values: seen.append([np.asarray(v) for v in values])  # noqa: E731
        jax.debug.callback(record, per_example_loss(tunable, batch), *batch)
        return trace_term(variant, per_example_loss, logits_fn, tunable, batch, key, *options)

    monkeypatch.setattr(fip, "trace_term", spy)
    return seen


@pytest.mark.parametrize("trace_bn_train", [False, True])
def test_fip_trace_term_uses_the_configured_batchnorm_mode(
    tiny, monkeypatch, retraced_fip, trace_bn_train
):
    """SPEC section 2 (choice): the trace term's per-example losses come from eval-mode BN
    (running statistics) by default, or from train-mode BN (the batch's own statistics)."""
    model, variables, clean, inputs, labels = tiny
    seen = _record_trace_batches(monkeypatch)
    config = fip.FIPConfig(
        steps=1,
        batch_size=len(clean),
        eta_F=1.0,
        augment=False,
        bn_train=False,
        trace_bn_train=trace_bn_train,
        calibration_probes=1,
    )
    fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    _calibration, (got, x, y) = seen  # TrF0's one calibration batch, then one step at theta0

    def losses(train):
        logits, _ = apply_model(model, variables["params"], variables["batch_stats"], x, train)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    np.testing.assert_allclose(got, losses(trace_bn_train), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, losses(not trace_bn_train), rtol=1e-3)


def test_fip_loss_curve_with_a_sparse_trace_names_the_last_trace_and_its_step(tiny):
    model, variables, clean, _, _ = tiny
    config = fip.FIPConfig(
        steps=12, batch_size=16, learning_rate=1e-4, trace_every=5, log_every=4,
        calibration_probes=1,
    )  # fmt: skip
    _, report = fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    curve = {entry["step"]: entry for entry in report.loss_curve}
    assert sorted(curve) == [1, 4, 8, 12]
    # the trace runs at steps 1, 6, 11 (0-based t = 0, 5, 10)
    assert [curve[s]["trace_step"] for s in (1, 4, 8, 12)] == [1, 1, 6, 11]
    assert curve[1]["loss"] > curve[1]["ce"] + curve[1]["anchor"]  # the trace term is in it
    assert curve[4]["loss"] == pytest.approx(curve[4]["ce"] + curve[4]["anchor"])
    assert curve[1]["anchor"] == 0.0  # taken at theta0, before the first update


@pytest.mark.parametrize("calibration", ["eval", "penalty"])
def test_fip_calibrates_trf0_in_eval_mode_or_in_the_penaltys_mode(
    tiny, monkeypatch, retraced_fip, calibration
):
    """``trace_calibration``: TrF0 comes from eval-mode BN (default) or from the penalised
    term's own mode (train mode here), so eta_F is relative to the penalty's starting value."""
    model, variables, clean, _, _ = tiny
    seen = _record_trace_batches(monkeypatch)
    config = fip.FIPConfig(
        steps=1,
        batch_size=len(clean),
        trace_bn_train=True,
        trace_calibration=calibration,
        calibration_probes=1,
    )
    fip.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    got, x, y = seen[0]  # the calibration batch

    def losses(train):
        logits, _ = apply_model(model, variables["params"], variables["batch_stats"], x, train)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    np.testing.assert_allclose(got, losses(calibration == "penalty"), rtol=1e-5, atol=1e-6)


@pytest.fixture
def float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _mlp(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _mlp_problem():
    key = jax.random.split(jax.random.key(3), 6)
    params = {
        "w1": jax.random.normal(key[0], (5, 6)),
        "b1": jax.random.normal(key[1], (6,)),
        "w2": jax.random.normal(key[2], (6, 3)),
        "b2": jax.random.normal(key[3], (3,)),
    }
    x = jax.random.normal(key[4], (12, 5))
    y = jax.random.randint(key[5], (12,), 0, 3)
    return params, x, y


def test_trace_variants_have_the_expectations_the_spec_gives(float64):
    params, x, y = _mlp_problem()

    def per_example(p, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, xb), yb)

    # each computation is jitted whole: op by op, the test compiled 230 small programs
    @jax.jit
    def exact_traces():
        grads = jax.vmap(
            lambda xi, yi: ravel_pytree(
                jax.grad(lambda p: per_example(p, (xi[None], yi[None]))[0])(params)
            )[0]
        )(x, y)
        empirical = jnp.mean(jnp.sum(grads**2, axis=1))
        # True Fisher trace: E_{y ~ p} ||grad log p(y|x)||^2, exactly over the K classes.
        probs = jax.nn.softmax(_mlp(params, x))
        per_class = jax.vmap(
            lambda c: jax.vmap(
                lambda xi: ravel_pytree(
                    jax.grad(lambda p: per_example(p, (xi[None], c[None]))[0])(params)
                )[0]
            )(x)
        )(jnp.arange(3))
        true = jnp.mean(jnp.sum(probs.T[..., None] * per_class**2, axis=(0, 2)))
        return empirical, true

    exact_empirical, exact_true = map(float, exact_traces())

    keys = jax.random.split(jax.random.key(0), 4000)

    def mean_of(variant, batch):
        values = jax.jit(
            jax.vmap(lambda k: trace_term(variant, per_example, _mlp, params, batch, k, 1))
        )(keys)
        return float(jnp.mean(values)), float(jnp.std(values) / math.sqrt(len(keys)))

    mean, stderr = mean_of("empirical", (x, y))
    assert abs(mean - exact_empirical) < 5 * stderr
    mean, stderr = mean_of("true", (x, y))  # labels sampled; y is not read
    assert abs(mean - exact_true) < 5 * stderr
    mean, stderr = mean_of("seed_code", (x, y))  # <grad CE, v>: zero in expectation
    assert abs(mean) < 5 * stderr and stderr > 0
    # the per_example estimator is the empirical trace itself, without probes
    exact = trace_term("empirical", per_example, _mlp, params, (x, y), keys[0], 1, "per_example")
    assert float(exact) == pytest.approx(exact_empirical, rel=1e-10)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"trace_variant": "true"}, "trace_variant=true needs trace_estimator=hutchinson"),
        ({"trace_bn_train": True}, "needs trace_bn_train=false"),
        ({"trace_probes": 4}, "uses no probes"),
        ({"calibration_probes": 64}, "leave calibration_probes at 8"),  # was ignored
    ],
)
def test_the_per_example_trace_estimator_refuses_settings_it_cannot_honour(overrides, fragment):
    with pytest.raises(InvalidInputError, match=fragment):
        fip.FIPConfig(trace_estimator="per_example", **overrides)


def test_fast_fip_per_example_trace_is_the_same_in_factored_and_rebuilt_form(tiny):
    """The exact trace differentiates through per-example gradients (vmap of grad) inside the
    factored layers' interceptor; both layer forms take the same steps."""
    model, variables, clean, _, _ = tiny
    runs = {}
    for form in ("factored", "rebuilt"):
        config = fast_fip.FastFIPConfig(
            steps=3,
            batch_size=20,
            learning_rate=0.05,
            log_every=1,
            kernel_form=form,
            trace_estimator="per_example",
        )
        runs[form] = fast_fip.purify(
            model, variables, clean, config, jax.random.key(2), progress=False
        )
    (factored_vars, factored), (rebuilt_vars, rebuilt) = runs["factored"], runs["rebuilt"]
    assert factored.extra["trace0"] == pytest.approx(rebuilt.extra["trace0"], rel=1e-4)
    for a, b in zip(factored.loss_curve, rebuilt.loss_curve, strict=True):
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-3)
    np.testing.assert_allclose(
        ravel_pytree(factored_vars["params"])[0],
        ravel_pytree(rebuilt_vars["params"])[0],
        rtol=1e-3,
        atol=1e-5,
    )


def test_fast_fip_with_zero_shifts_reproduces_the_original_logits(tiny):
    model = create_model("preact_resnet18", 10, width=8)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    factors = decompose(variables["params"])
    rebuilt = rebuild_params(variables["params"], factors, init_shifts(factors))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    apply = jax.jit(model.apply)  # one program, not one per operation
    np.testing.assert_allclose(
        apply({**variables, "params": rebuilt}, x), apply(variables, x), rtol=1e-4, atol=1e-4
    )
    kernels = [k for k in jax.tree_util.tree_leaves(variables["params"]) if k.ndim >= 2]
    assert num_shifts(factors) == sum(min(math.prod(k.shape[:-1]), k.shape[-1]) for k in kernels)


def test_fast_fip_only_moves_singular_values(tiny):
    model, variables, clean, _, _ = tiny
    config = fast_fip.FastFIPConfig(steps=5, batch_size=20, learning_rate=0.05, log_every=5)
    out, report = fast_fip.purify(model, variables, clean, config, progress=False)
    shifts = report.artifacts["spectral_shifts"]
    assert report.tunable_parameters == num_shifts(decompose(variables["params"]))
    for (path, kernel), (_, new) in zip(
        jax.tree_util.tree_flatten_with_path(variables["params"])[0],
        jax.tree_util.tree_flatten_with_path(out["params"])[0],
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        if kernel.ndim < 2:  # biases and BatchNorm affine parameters are frozen
            np.testing.assert_array_equal(new, kernel, err_msg=name)
            continue
        u, s, vt = np.linalg.svd(np.asarray(kernel).reshape(-1, kernel.shape[-1]), False)
        # the new kernel keeps the singular vectors: U^T W' V is diagonal
        projected = u.T @ np.asarray(new).reshape(-1, kernel.shape[-1]) @ vt.T
        np.testing.assert_allclose(projected - np.diag(np.diag(projected)), 0, atol=1e-4)
    assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree_util.tree_leaves(shifts))


@pytest.mark.parametrize("form", ["factored", "rebuilt"])
def test_fast_fip_can_also_tune_the_batchnorm_affine_parameters(tiny, form):
    """SPEC section 3's choice, the other way: BatchNorm scales and offsets train next to the
    shifts; other biases stay frozen."""
    model, variables, clean, _, _ = tiny
    config = fast_fip.FastFIPConfig(
        steps=3,
        batch_size=20,
        learning_rate=0.05,
        log_every=3,
        tune_bn_affine=True,
        kernel_form=form,
    )
    out, report = fast_fip.purify(model, variables, clean, config, progress=False)
    affine = fast_fip.batchnorm_affine(variables)
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(affine))
    assert count > 0
    assert report.tunable_parameters == num_shifts(decompose(variables["params"])) + count
    moved = fast_fip.batchnorm_affine(out)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(affine), jax.tree_util.tree_leaves(moved), strict=True
        )
    )
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        report.artifacts["batchnorm_affine"],
        moved,
    )
    np.testing.assert_array_equal(
        out["params"]["head"]["bias"], variables["params"]["head"]["bias"]
    )


def test_fast_fip_layer_forms_take_the_same_steps(tiny):
    """kernel_form=factored (the default) and rebuilt optimise the same objective: equal
    losses and shifts after a few steps, up to float32 rounding."""
    model, variables, clean, _, _ = tiny
    runs = {}
    for form in ("factored", "rebuilt"):
        config = fast_fip.FastFIPConfig(
            steps=4, batch_size=20, learning_rate=0.05, log_every=1, kernel_form=form
        )
        runs[form] = fast_fip.purify(model, variables, clean, config, key=3, progress=False)[1]
    curves = [[p["loss"] for p in runs[f].loss_curve] for f in ("factored", "rebuilt")]
    np.testing.assert_allclose(*curves, rtol=1e-4)
    for a, b in zip(
        jax.tree_util.tree_leaves(runs["factored"].artifacts["spectral_shifts"]),
        jax.tree_util.tree_leaves(runs["rebuilt"].artifacts["spectral_shifts"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_nft_masks_stay_between_their_floor_and_one(tiny):
    model, variables, clean, _, _ = tiny
    config = nft.NFTConfig(
        steps=40, batch_size=20, learning_rate=5.0, mask_pattern=r"^bn\d+$", log_every=10
    )
    out, report = nft.purify(model, variables, clean, config, progress=False)
    masks = report.artifacts["masks"]
    floors = layer_floors(masks, "exponential", 0.8, 0.5)
    assert [floors[f"bn{i}"] for i in (1, 2, 3)] == pytest.approx(
        [0.8 * math.exp(-0.5 * i) for i in (1, 2, 3)]
    )
    hit_floor = False
    for name, mask in masks.items():
        mask = np.asarray(mask)
        assert mask.min() >= np.float32(floors[name]) and mask.max() <= 1.0  # exactly
        hit_floor |= bool(np.isclose(mask, floors[name], atol=1e-6).any())
        np.testing.assert_allclose(
            out["params"][name]["scale"], variables["params"][name]["scale"] * mask, rtol=1e-6
        )
    assert hit_floor  # the large learning rate pushes some masks onto their floor
    for name in ("conv1", "conv2", "conv3", "head"):  # weights are frozen
        np.testing.assert_array_equal(
            out["params"][name]["kernel"], variables["params"][name]["kernel"]
        )


class _BatchNormThenLayerNorm(nn.Module):
    """A BatchNorm and a LayerNorm: both have a ``scale`` and a ``bias``, only one keeps
    ``batch_stats``."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.LayerNorm(name="ln")(x)
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def test_nft_mixup_blends_images_and_one_hot_targets_with_one_lambda():
    x = jnp.arange(3 * 2 * 2 * 1, dtype=jnp.float32).reshape(3, 2, 2, 1)
    y = jnp.array([0, 2, 1])
    partner = jnp.array([2, 0, 1])
    x_mix, targets = nft.mixup_batch(x, y, jnp.float32(0.3), partner, 4)
    np.testing.assert_allclose(x_mix, 0.3 * x + 0.7 * x[partner], rtol=1e-6)
    want = np.zeros((3, 4), np.float32)
    for row, (a, b) in enumerate(zip([0, 2, 1], [1, 0, 2], strict=True)):  # y, y[partner]
        want[row, a] += 0.3
        want[row, b] += 0.7
    np.testing.assert_allclose(targets, want, rtol=1e-6)


def test_nft_objective_is_mixup_cross_entropy_plus_the_scaled_l1_pull_to_one(tiny):
    """SPEC section 4: lam * CE(y) + (1 - lam) * CE(y[partner]) of the masked network on the
    mixed images, plus eta / N_c * sum |1 - m|."""
    model, variables, clean, inputs, labels = tiny
    masks = nft._batchnorm_masks(variables, r"^bn\d+$")
    masks = jax.tree_util.tree_map(
        lambda m: jnp.linspace(0.4, 0.9, m.size, dtype=m.dtype).reshape(m.shape), masks
    )
    lam, partner = 0.3, jnp.roll(jnp.arange(len(labels)), 1)
    x_mix, targets = nft.mixup_batch(inputs, labels, jnp.float32(lam), partner, 10)
    loss, (_, mixup, l1) = nft.nft_objective(
        masks, model, variables["params"], variables["batch_stats"], x_mix, targets, 0.25, False
    )
    scaled = jax.tree_util.tree_map(lambda a: a, variables["params"])
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        module = path[0].key
        scaled[module] = {**scaled[module], "scale": scaled[module]["scale"] * mask}
    logits = model.apply({**variables, "params": scaled}, x_mix, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels
    want_ce = jnp.mean(lam * ce(logits, labels) + (1 - lam) * ce(logits, labels[partner]))
    want_l1 = sum(float(jnp.sum(1.0 - m)) for m in jax.tree_util.tree_leaves(masks))
    assert float(mixup) == pytest.approx(float(want_ce), rel=1e-5)
    assert float(l1) == pytest.approx(want_l1, rel=1e-5)
    assert float(loss) == pytest.approx(float(want_ce) + 0.25 * want_l1, rel=1e-5)


def test_nft_l1_strength_is_eta_over_the_clean_images_per_class(tiny):
    model, variables, clean, _, _ = tiny  # 40 images, 4 per class
    config = nft.NFTConfig(steps=1, batch_size=8, eta=2.0, mask_pattern="^bn[23]$")
    _, report = nft.purify(model, variables, clean, config, progress=False)
    assert report.extra["clean_per_class"] == 4
    assert report.extra["l1_strength"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("model", "pattern", "fragment"),
    [
        (create_model("vit_small", 10, width=8, depth=1, num_heads=2), r"^bn\d+$", "no BatchNorm"),
        (create_model("vit_small", 10, width=8, depth=1, num_heads=2), "ln", "no BatchNorm"),
        (_BatchNormThenLayerNorm(), "n$", "chooses ln, which keep no batch_stats"),
    ],
    ids=["vit", "vit_layernorms", "layernorm_next_to_batchnorm"],
)
def test_nft_masks_batchnorm_channels_only(tiny, model, pattern, fragment):
    """SPEC section 4: one mask per BatchNorm channel. A model without BatchNorm (the ViT) is
    refused, and so is a pattern that chooses a LayerNorm, whose scale would otherwise be
    masked as if it were a BatchNorm's."""
    clean = tiny[2]
    variables = init_variables(model, jax.random.key(0), clean.spec.image_shape)
    config = nft.NFTConfig(steps=1, mask_pattern=pattern)
    with pytest.raises(InvalidInputError, match=fragment):
        nft.purify(model, variables, clean, config, progress=False)


@pytest.mark.parametrize("rate", [0.01, 0.02])
def test_nft_learning_rate_below_the_floor_is_kept_not_raised_to_the_floor(rate):
    schedule = nft.learning_rate_schedule(nft.NFTConfig(steps=1000, learning_rate=rate))
    values = [float(schedule(step)) for step in (0, 199, 200, 400, 600, 800, 999)]
    assert values == pytest.approx([rate] * 7, rel=1e-6)


def test_nft_learning_rate_follows_five_floored_cosine_blocks():
    schedule = nft.learning_rate_schedule(nft.NFTConfig(steps=1000))
    values = [float(schedule(step)) for step in (0, 199, 200, 400, 600, 800, 999)]
    expected_blocks = [max(0.02, 0.05 * 0.5 * (1 + math.cos(math.pi * b / 5))) for b in range(5)]
    assert values == pytest.approx(
        [expected_blocks[0], expected_blocks[0], *expected_blocks[1:], expected_blocks[4]], rel=1e-5
    )


@pytest.mark.parametrize(
    "changes",
    [{}, {"schedule": "cosine"}, {"schedule": "constant"}, {"lr_blocks": 3, "lr_floor": 0.0},
     {"learning_rate": 0.07, "steps": 37}],
)  # fmt: skip
def test_nft_steps_read_the_rate_its_schedule_gives_to_the_last_bit(changes):
    """The compiled step indexes a vector of per-step rates (so that a sweep over the rate or
    its schedule reuses it); each rate is the one the schedule gives at that step in a
    compiled program, bit for bit, as the step computed it before."""
    config = nft.NFTConfig(**{"steps": 25, **changes})
    schedule = jax.jit(nft.learning_rate_schedule(config))
    expected = [np.float32(schedule(jnp.int32(step))) for step in range(config.steps)]
    rates = nft.learning_rates(config)
    assert rates.shape == (config.steps,)
    np.testing.assert_array_equal(np.asarray(rates, np.float32), expected)


def test_nft_learning_rates_compile_once_for_a_sweep_over_the_rate_and_its_floor():
    nft.learning_rates(nft.NFTConfig(steps=25))
    before = nft._scheduled_rates._cache_size()
    for rate, floor in ((0.1, 0.02), (0.03, 0.01), (0.5, 0.1)):
        nft.learning_rates(nft.NFTConfig(steps=25, learning_rate=rate, lr_floor=floor))
    assert nft._scheduled_rates._cache_size() == before


def _ngf_newton_config(clean, **changes) -> ngf.NGFConfig:
    """NGF as a damped Newton step on the head: one step on the whole clean set, the Fisher
    refreshed every step, no anchor and no trust region, unless ``changes`` say otherwise."""
    base = dict(
        steps=1, batch_size=len(clean), eta_r=0.0, kl_clip=None, refresh_every=1, log_every=1
    )
    return ngf.NGFConfig(**{**base, **changes})


def test_ngf_step_on_the_head_is_the_damped_newton_step(tiny):
    model, variables, clean, inputs, labels = tiny
    alpha, damping = 0.3, 1e-2
    config = _ngf_newton_config(clean, learning_rate=alpha, damping=damping)
    out, report = ngf.purify(model, variables, clean, config, progress=False)
    features = penultimate_features(model, variables, inputs)
    head0 = variables["params"]["head"]
    flat, unravel = ravel_pytree(head0)

    def loss(vector):
        head = unravel(vector)
        logits = features @ head["kernel"] + head["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    @jax.jit  # one program rather than one per operation
    def newton_step(vector):
        hessian = jax.hessian(loss)(vector)  # = the Fisher of a linear softmax layer
        damped = hessian + damping * jnp.eye(vector.size)
        return vector - alpha * jnp.linalg.solve(damped, jax.grad(loss)(vector))

    np.testing.assert_allclose(
        ravel_pytree(out["params"]["head"])[0], newton_step(flat), rtol=1e-3, atol=1e-5
    )
    assert report.tunable_parameters == flat.size and report.extra["solver"] == "dense"


def _head_as_vector(model, variables, inputs, labels):
    """The head's parameters as one vector, and the per-example CE of the head as a function
    of that vector (the penultimate features held fixed)."""
    features = penultimate_features(model, variables, inputs)
    flat, unravel = ravel_pytree(variables["params"]["head"])

    def per_example(vector):
        head = unravel(vector)
        logits = features @ head["kernel"] + head["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    return flat, per_example


@pytest.mark.parametrize("anchor_curvature", [True, False])
def test_ngf_step_with_the_anchor_preconditions_by_its_curvature_too(tiny, anchor_curvature):
    # SPEC section 5 with the anchor: one step is
    # -alpha (F + eta_r diag(Fbar) [if anchor_curvature] + lambda I)^-1 (grad CE + anchor grad);
    # at theta0 the anchor's gradient is zero, so only the preconditioner differs.
    model, variables, clean, inputs, labels = tiny
    alpha, damping, eta_r = 0.3, 1e-2, 5.0
    config = _ngf_newton_config(
        clean, learning_rate=alpha, damping=damping, eta_r=eta_r, anchor_curvature=anchor_curvature
    )
    out, _ = ngf.purify(model, variables, clean, config, progress=False)
    flat, per_example = _head_as_vector(model, variables, inputs, labels)
    loss = lambda vector: jnp.mean(per_example(vector))  # noqa: E731
    fisher_diag = jnp.mean(jax.jacrev(per_example)(flat) ** 2, axis=0)
    curvature = jax.hessian(loss)(flat) + damping * jnp.eye(flat.size)
    if anchor_curvature:
        curvature = curvature + eta_r * jnp.diag(fisher_diag)
    expected = flat - alpha * jnp.linalg.solve(curvature, jax.grad(loss)(flat))
    np.testing.assert_allclose(
        ravel_pytree(out["params"]["head"])[0], expected, rtol=1e-3, atol=1e-5
    )


def test_ngf_second_step_preconditions_with_the_fisher_at_the_current_head(tiny):
    """refresh_every=1: step 2 is the damped Newton step taken at theta1, not at theta0."""
    model, variables, clean, inputs, labels = tiny
    alpha, damping = 0.3, 1e-2
    config = _ngf_newton_config(clean, steps=2, learning_rate=alpha, damping=damping)
    heads = []
    out, _ = ngf.purify(
        model, variables, clean, config, progress=False, observe_every=1,
        observer=lambda step, v: heads.append(v["params"]["head"]),
    )  # fmt: skip
    _, per_example = _head_as_vector(model, variables, inputs, labels)
    theta1, _ = ravel_pytree(heads[0])
    loss = lambda v: jnp.mean(per_example(v))  # noqa: E731
    damped = jax.jit(jax.hessian(loss))(theta1) + damping * jnp.eye(theta1.size)
    want = theta1 - alpha * jnp.linalg.solve(damped, jax.grad(loss)(theta1))
    np.testing.assert_allclose(ravel_pytree(out["params"]["head"])[0], want, rtol=1e-3, atol=1e-5)


def test_ngf_kl_clip_bounds_the_steps_quadratic_kl_half_u_f_u(tiny):
    """SPEC section 5's trust region: a clipped step u has KL ~ 0.5 u^T F u equal to kl_clip."""
    model, variables, clean, inputs, labels = tiny
    clip = 1e-4
    config = _ngf_newton_config(clean, learning_rate=1.0, damping=1e-3, kl_clip=clip)
    out, report = ngf.purify(model, variables, clean, config, progress=False)
    assert report.loss_curve[0]["trust_scale"] < 1.0  # the clip was active
    theta0, per_example = _head_as_vector(model, variables, inputs, labels)
    fisher = jax.jit(jax.hessian(lambda v: jnp.mean(per_example(v))))(theta0)  # linear head
    u = ravel_pytree(out["params"]["head"])[0] - theta0
    assert 0.5 * float(u @ fisher @ u) == pytest.approx(clip, rel=2e-3)


def test_ngf_kl_trust_region_bounds_each_step(tiny):
    model, variables, clean, _, _ = tiny
    config = ngf.NGFConfig(
        steps=20, batch_size=20, learning_rate=1.0, damping=1e-4, kl_clip=1e-3, log_every=1
    )
    _, report = ngf.purify(model, variables, clean, config, progress=False)
    for entry in report.loss_curve:
        assert entry["kl"] * entry["trust_scale"] ** 2 <= 1e-3 * (1 + 1e-3)


def test_ngf_loss_curve_is_the_objective_cross_entropy_plus_the_anchor(tiny):
    """SPEC section 5: NGF descends CE + (eta_r / 2) sum Fbar (theta - theta0)^2; the curve's
    ``loss`` is that objective at the step's iterate, with ``ce`` and ``anchor`` beside it."""
    model, variables, clean, inputs, labels = tiny
    eta_r = 3.0
    config = ngf.NGFConfig(
        steps=2, batch_size=len(clean), eta_r=eta_r, kl_clip=None, refresh_every=1, log_every=1
    )
    seen = []
    _, report = ngf.purify(
        model,
        variables,
        clean,
        config,
        progress=False,
        observer=lambda step, v: seen.append(v["params"]["head"]),
        observe_every=1,
    )
    flat, per_example = _head_as_vector(model, variables, inputs, labels)
    fisher_diag = jax.jit(lambda v: jnp.mean(jax.jacrev(per_example)(v) ** 2, axis=0))(flat)
    theta1 = ravel_pytree(seen[0])[0]
    first, second = report.loss_curve
    assert first["anchor"] == 0.0 and first["loss"] == pytest.approx(first["ce"])
    assert second["ce"] == pytest.approx(float(jnp.mean(per_example(theta1))), rel=1e-5)
    want = 0.5 * eta_r * float(jnp.sum(fisher_diag * (theta1 - flat) ** 2))
    assert want > 0 and second["anchor"] == pytest.approx(want, rel=1e-3)
    assert second["loss"] == pytest.approx(second["ce"] + second["anchor"], rel=1e-6)


def test_ngf_trains_any_layer_by_conjugate_gradient(tiny):
    model, variables, clean, _, _ = tiny
    config = ngf.NGFConfig(steps=3, batch_size=20, layer="conv3", log_every=1)
    out, report = ngf.purify(model, variables, clean, config, progress=False)
    assert report.extra == {"solver": "cg", "layer": "conv3"}
    assert not np.allclose(out["params"]["conv3"]["kernel"], variables["params"]["conv3"]["kernel"])
    np.testing.assert_array_equal(
        out["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )


@pytest.mark.parametrize("layer", ["conv9", "", "/", "head/kernel"])
def test_ngf_names_the_layers_when_the_layer_is_not_one(tiny, layer):
    # an empty path would train the whole network; a parameter array is not a layer
    model, variables, clean, _, _ = tiny
    with pytest.raises(InvalidInputError, match=f"no layer '{layer}'.*conv3"):
        ngf.purify(model, variables, clean, ngf.NGFConfig(steps=1, layer=layer), progress=False)


def test_ngf_refuses_zero_damping_in_its_config():
    with pytest.raises(InvalidInputError, match="damping"):
        ngf.NGFConfig(damping=0.0)


@pytest.mark.parametrize("method", ["fip", "nft", "ngf", "ft"])
def test_the_report_gives_the_batch_size_used_when_the_clean_set_is_smaller(tiny, method):
    """A batch larger than the clean set is capped at its size (SPEC's 10-image ablation): the
    config keeps the request and the report says what was used."""
    model, variables, clean, _, _ = tiny
    overrides = {"steps": "1", "batch_size": "64"}
    overrides |= {"fip": {"calibration_probes": "1"}, "nft": {"mask_pattern": r"^bn\d+$"}}.get(
        method, {}
    )
    config = make_config(method, overrides)
    _, report = get_defense(method).purify(model, variables, clean, config, 0, progress=False)
    assert report.config["batch_size"] == 64 and report.batch_size == len(clean) == 40


def test_fast_fips_wall_time_includes_its_svds(tiny, monkeypatch):
    # the clock started after the SVD of every kernel, so the speed comparison with FIP left
    # Fast FIP's own set-up out; a decomposition made slow on purpose must show in it
    model, variables, clean, _, _ = tiny
    config = make_config("fast_fip", {"steps": 1, "batch_size": 16})
    fast_fip.purify(model, variables, clean, config, 0, progress=False)  # compiles
    svd_seconds = 2.0

    def slow_decompose(*args, **kwargs):
        time.sleep(svd_seconds)
        return decompose(*args, **kwargs)

    monkeypatch.setattr(fast_fip, "decompose", slow_decompose)
    _, report = fast_fip.purify(model, variables, clean, config, 0, progress=False)
    assert report.wall_time_s >= svd_seconds


@pytest.mark.parametrize("trace_scale", ["relative", "absolute"])
def test_a_zero_fisher_trace_at_theta0_stops_only_the_relative_scale(
    tiny, monkeypatch, trace_scale
):
    # a saturated model has zero per-example gradients; the absolute scale, which does not
    # divide by TrF0, was refused as well
    model, variables, clean, _, _ = tiny
    monkeypatch.setattr(fip, "_trace_estimate", lambda *args, **kwargs: jnp.zeros(()))
    config = make_config("fip", {"steps": 1, "batch_size": 16, "trace_scale": trace_scale})
    if trace_scale == "relative":
        with pytest.raises(InvalidInputError, match="Fisher trace at theta0 is 0.0"):
            fip.purify(model, variables, clean, config, 0, progress=False)
    else:
        _, report = fip.purify(model, variables, clean, config, 0, progress=False)
        assert report.extra["trace0"] == 0.0 and report.steps == 1


def _smoothed_ce(model, variables, inputs, labels, smoothing):
    """Mean CE of the model (BN in eval mode) against labels smoothed by hand: (1 - a) e_y + a/K."""

    def loss(params):
        logits = model.apply({**variables, "params": params}, inputs, train=False)
        targets = (1 - smoothing) * jax.nn.one_hot(labels, 10) + smoothing / 10
        return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))

    return loss


def test_ft_steps_are_sgd_with_coupled_weight_decay_on_a_cosine_schedule(tiny):
    """SPEC section 6: FT is SGD on CE plus L2 decay; the cosine schedule halves step 2 of 2."""
    model, variables, clean, inputs, labels = tiny
    lr, wd, smoothing = 0.05, 0.01, 0.2
    config = ft.FTConfig(
        steps=2, batch_size=len(clean), learning_rate=lr, momentum=0.0, weight_decay=wd,
        label_smoothing=smoothing, augment=False, bn_train=False,
    )  # fmt: skip
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    loss = _smoothed_ce(model, variables, inputs, labels, smoothing)

    @jax.jit
    def two_steps(theta0):
        def step(theta, rate):
            return jax.tree_util.tree_map(
                lambda p, g: p - rate * (g + wd * p), theta, jax.grad(loss)(theta)
            )

        return step(step(theta0, lr), lr / 2)

    want = two_steps(variables["params"])
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )


@pytest.mark.parametrize(("adaptive", "eta"), [(True, 0.01), (True, 0.3), (False, 0.01)])
def test_ft_sam_step_takes_the_gradient_at_the_adaptive_sam_point(tiny, adaptive, eta):
    """FT-SAM (ASAM, Kwon et al. 2021): the gradient at theta + rho T^2 g / ||T g||, with
    T = |theta| + eta (T = I for plain SAM, ``adaptive=False``), then FT's update; label
    smoothing 0.1 by default. A step that ignored ``eta`` or ``adaptive`` passed at the
    defaults alone."""
    model, variables, clean, inputs, labels = tiny
    lr, rho = 0.05, 0.5
    config = ft.FTSAMConfig(
        steps=1, batch_size=len(clean), learning_rate=lr, momentum=0.0, weight_decay=0.0,
        rho=rho, eta=eta, adaptive=adaptive, augment=False, bn_train=False, schedule="constant",
    )  # fmt: skip
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    loss = _smoothed_ce(model, variables, inputs, labels, 0.1)

    @jax.jit
    def step(theta):
        g = jax.grad(loss)(theta)
        scale = jax.tree_util.tree_map(
            lambda p: jnp.abs(p) + eta if adaptive else jnp.ones_like(p), theta
        )
        tg = jax.tree_util.tree_map(lambda t, gi: t * gi, scale, g)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(tg)))
        point = jax.tree_util.tree_map(lambda p, t, x: p + rho * t * x / norm, theta, scale, tg)
        return jax.tree_util.tree_map(lambda p, gs: p - lr * gs, theta, jax.grad(loss)(point))

    want = step(variables["params"])
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )


def test_ft_steps_carry_their_momentum(tiny):
    """Two constant-rate steps with momentum m: theta2 = theta1 - lr (g1 + m g0)."""
    model, variables, clean, inputs, labels = tiny
    lr, m = 0.05, 0.9
    config = ft.FTConfig(
        steps=2,
        batch_size=len(clean),
        learning_rate=lr,
        schedule="constant",
        momentum=m,
        weight_decay=0.0,
        augment=False,
        bn_train=False,
    )
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    grad = jax.jit(jax.grad(_smoothed_ce(model, variables, inputs, labels, 0.0)))
    theta0 = variables["params"]
    g0 = grad(theta0)
    theta1 = jax.tree_util.tree_map(lambda p, g: p - lr * g, theta0, g0)
    g1 = grad(theta1)
    want = jax.tree_util.tree_map(lambda p, a, b: p - lr * (a + m * b), theta1, g1, g0)
    np.testing.assert_allclose(
        ravel_pytree(out["params"])[0], ravel_pytree(want)[0], rtol=2e-4, atol=2e-6
    )


def test_ft_in_bn_train_mode_returns_the_running_statistics_its_steps_updated(tiny):
    """One train-mode step on the whole clean set: the returned running statistics are the
    ones BatchNorm's train-mode pass over that batch leaves."""
    model, variables, clean, inputs, _ = tiny
    config = ft.FTConfig(
        steps=1,
        batch_size=len(clean),
        learning_rate=0.01,
        augment=False,
        bn_train=True,
        final_batch_stats="running",
    )
    out, _ = ft.purify(model, variables, clean, config, jax.random.key(0), progress=False)
    _, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        out["batch_stats"],
        updates["batch_stats"],
    )
    assert any(
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(out["batch_stats"]),
            jax.tree_util.tree_leaves(variables["batch_stats"]),
            strict=True,
        )
    )


def test_ft_and_ft_sam_defaults_are_the_documented_ones():
    """BackdoorBench's FT settings; FT-SAM: ASAM with rho 2.0, eta 0.01, label smoothing 0.1."""
    sam = ft.FTSAMConfig()
    assert (sam.rho, sam.eta, sam.adaptive, sam.label_smoothing) == (2.0, 0.01, True, 0.1)
    plain = ft.FTConfig()
    assert (plain.learning_rate, plain.momentum, plain.weight_decay, plain.schedule) == (
        0.01,
        0.9,
        5e-4,
        "cosine",
    )
    assert plain.label_smoothing == 0.0
