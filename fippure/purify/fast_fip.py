"""Fast FIP: FIP's objective over singular-value shifts (Karim et al., "Fisher Information
guided Purification against Backdoor Attacks", ACM CCS 2024), SPEC section 3.

Every conv/dense kernel, reshaped to ``(H*W*I, O)``, is factored once as
``W = U diag(s) V^T``; only one shift per singular value is trained,
``W(d) = U diag(relu(s + d)) V^T`` with ``d = 0`` initially (:mod:`fippure.optim.spectral`).
``U, s, V`` stay frozen in a pytree of their own (an argument of the jitted step, not a
compiled-in constant), and the step evaluates the network at
``W(d)``: in factored form by default, or with the kernels rebuilt (see the cost below). The
loss is FIP's, with the Fisher trace and the Fisher anchor taken with respect to
``d``. BatchNorm affine parameters and biases are frozen; BatchNorm statistics re-estimate on
D_v (**choice**; ``tune_bn_affine`` trains the BatchNorm scales and offsets as well, and
``bn_train=False`` keeps the statistics). PreAct-ResNet-18 has about 4.3k shifts at width 64
(1.1k at width 16).

The anchor strength ``eta_r`` does not carry over from FIP: the anchor weighs each tuned
scalar by its diagonal Fisher, and a shift's (or a BatchNorm scale's) entry is far larger
than a weight's (on the zoo's BadNets model 8x and 70x the mean per weight). FIP's eta_r 10
pinned the shifts and left the backdoor; eta_r 1 with ``tune_bn_affine`` removed it
(``experiments/results/probes/fast_fip_anchor.md``).

Cost per step: the paper reports Fast FIP about 5x faster than FIP
(``experiments/fast_fip_speed.py`` measures it; results in
``experiments/results/fast_fip_speed.md``). The saving does not come from the number of tuned
scalars: FIP's trace is already a Hutchinson ``jvp`` whose cost does not grow with it. It comes
from the layer form (``kernel_form``, **choice**):

- ``factored`` (default): each conv/dense layer runs as ``((x * U) * relu(s + d)) V^T``
  (:func:`fippure.optim.spectral.factored`), so the kernels are constants of the step. The
  reverse pass computes input gradients only, where FIP also computes a kernel gradient per
  convolution, and a tangent in ``d`` costs one convolution per layer, where FIP's costs two.
  Measured on PreAct-ResNet-18 width 16 (2 CPU cores): 1.5-2.0x faster per step than FIP,
  depending on the day's load on the shared machine (1.98x on an H200).
- ``rebuilt``: ``W(d)`` is formed every step and the network runs as usual. It is the
  reference form, and on 2 CPU cores a step costs what a FIP step costs.

The factored form also makes the trace exact at little cost: a shift's per-example gradient
is a per-channel sum of the layer's ``x * U`` output times its output gradient, so
``trace_estimator="per_example"`` (:func:`fippure.curvature.per_example_fisher_trace`) forms
every example's gradient and differentiates their squared norms, with no probe noise, at about
the cost of one probe (BatchNorm in eval mode for the term). For FIP's full weights the same
estimator forms per-example kernel gradients and is impractical on a ResNet.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import flax
import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util
from jaxtyping import PRNGKeyArray

from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.models.registry import Variables, variables_must_fit
from fippure.optim.spectral import (
    KERNEL_PATTERN,
    decompose,
    factored,
    init_shifts,
    layer_input_axes,
    rebuild_params,
)
from fippure.purify.common import (
    Observer,
    PurifyReport,
    apply_model,
    as_variables,
    batchnorm_modules,
    defense_arguments,
    device_variables,
    on_the_variables_device,
    validate_clean_set,
)
from fippure.purify.fip import FIPConfig, fisher_guided_purify
from fippure.purify.resume import Checkpointing


@dataclasses.dataclass(frozen=True)
class FastFIPConfig(FIPConfig):
    """FIP's settings plus the kernel selection and the layer form.

    Attributes:
        kernel_pattern: regular expression over parameter paths choosing the kernels to
            reparameterise (default: every conv and dense kernel, i.e. every parameter named
            ``kernel``). The report lists the parameters of two or more axes it left out in
            ``extra["kernels_left_out"]``.
        kernel_form: how a reparameterised layer runs inside the steps: ``factored``
            (a convolution with the frozen ``U``, a channel scale ``relu(s + d)`` and a matmul
            with the frozen ``V^T``; **choice**, about twice as fast) or ``rebuilt``
            (``W(d)`` formed every step). Both compute the same function up to rounding.
        tune_bn_affine: also train every BatchNorm's scale and offset (the modules that keep
            batch statistics), next to the shifts; the Fisher terms then cover them too.
            ``False`` (SPEC section 3, **choice**) freezes them.
    """

    kernel_pattern: str = KERNEL_PATTERN
    kernel_form: Literal["factored", "rebuilt"] = "factored"
    tune_bn_affine: bool = False


@on_the_variables_device
def purify(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: FastFIPConfig = FastFIPConfig(),
    key: PRNGKeyArray | None = None,
    *,
    progress: bool = True,
    observer: Observer | None = None,
    observe_every: int = 0,
    checkpointing: Checkpointing | None = None,
) -> tuple[dict, PurifyReport]:
    """Fast FIP; returns ``(variables with rebuilt kernels, report)``.

    The trained shifts are in ``report.artifacts['spectral_shifts']``. The report's wall time
    includes the SVD of every kernel.
    """
    started = time.perf_counter()
    key = defense_arguments("fast_fip", config, FastFIPConfig, key)
    # before the model is traced for its layers' input axes (one line for a model or clean
    # set the defense cannot use; fisher_guided_purify checks the rest)
    validate_clean_set(clean_set, model, variables)
    variables = device_variables(variables)
    params = variables["params"]
    with variables_must_fit(model):  # each DenseGeneral's input axes, read from the model
        input_axes = layer_input_axes(model, variables, clean_set.spec.image_shape)
    factors = decompose(params, config.kernel_pattern, input_axes=input_axes)
    # The tunable tree: the shifts alone, or {"shifts", "bn_affine"} with tune_bn_affine.
    tunable = init_shifts(factors)
    if config.tune_bn_affine:
        tunable = {"shifts": tunable, "bn_affine": batchnorm_affine(variables)}

    # The factors and the original weights are frozen: arguments of the jitted functions.
    frozen = {"factors": factors, "params": params}
    to_params = ShiftedParams(config.tune_bn_affine)

    shifts, stats, report = fisher_guided_purify(
        model,
        variables,
        clean_set,
        config,
        key,
        tunable=tunable,
        to_params=to_params,
        apply_tunable=FactoredApply(model, to_params) if config.kernel_form == "factored" else None,
        frozen=frozen,
        method="fast_fip",
        progress=progress,
        observer=observer,
        observe_every=observe_every,
        checkpointing=checkpointing,
        started=started,
    )
    report.artifacts["spectral_shifts"] = to_params.shifts(shifts)
    # weights of two or more axes that kernel_pattern left out (a hand-made self.param("w")),
    # so that a model whose matrices are not all named "kernel" is not purified in part unseen
    decomposed = traverse_util.flatten_dict(factors)
    report.extra["kernels_left_out"] = [
        "/".join(path)
        for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(params)).items()
        if jnp.ndim(leaf) >= 2 and path not in decomposed
    ]
    if config.tune_bn_affine:
        report.artifacts["batchnorm_affine"] = shifts["bn_affine"]
    return as_variables(to_params(shifts, frozen), stats), report


@dataclasses.dataclass(frozen=True)
class ShiftedParams:
    """``to_params(tunable, frozen)``: the parameters with every chosen kernel rebuilt as
    ``U diag(relu(s + d)) V^T`` from the shifts ``d`` (and, with ``tune_bn_affine``, the
    tuned BatchNorm scales and offsets put in). Compared by value, so a second run reuses the
    compiled steps."""

    tune_bn_affine: bool

    def shifts(self, tunable: Any) -> Any:
        return tunable["shifts"] if self.tune_bn_affine else tunable

    def __call__(self, tunable: Any, frozen: Any) -> Any:
        base = frozen["params"]
        if self.tune_bn_affine:
            base = with_batchnorm_affine(base, tunable["bn_affine"])
        return rebuild_params(base, frozen["factors"], self.shifts(tunable))


@dataclasses.dataclass(frozen=True)
class FactoredApply:
    """``apply_tunable`` in factored form: each reparameterised layer runs as a convolution
    with ``U``, a channel scale and a matmul with ``V^T`` (:func:`fippure.optim.spectral.
    factored`); layers that cannot run factored read their rebuilt kernels, and jit drops the
    others."""

    model: nn.Module
    to_params: ShiftedParams

    def __call__(self, t, frozen, stats, x, train, key=None):
        with factored(frozen["factors"], self.to_params.shifts(t)):
            return apply_model(self.model, self.to_params(t, frozen), stats, x, train, key)


def batchnorm_affine(variables: Variables) -> dict:
    """The ``scale`` and ``bias`` of every BatchNorm, i.e. of each module that keeps
    ``batch_stats``, nested as in ``params``."""
    modules = batchnorm_modules(variables)
    if not modules:
        raise InvalidInputError("tune_bn_affine: the model has no BatchNorm layers")
    flat = traverse_util.flatten_dict(variables["params"])
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[:-1] in modules})


def with_batchnorm_affine(params: dict, affine: dict) -> dict:
    """``params`` with the BatchNorm scales and offsets of ``affine`` put in."""
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(affine))
    return traverse_util.unflatten_dict(flat)
