"""NGF: natural-gradient fine-tuning of one layer (Karim et al., "Efficient Backdoor Removal
Through Natural Gradient Fine-tuning", 2023), SPEC section 5.

Only one layer is trained (the dense ``head`` by default), everything else frozen with
BatchNorm in eval mode. The update is

    theta <- theta - alpha (F + lambda I)^-1 grad(CE + (eta_r / 2) sum Fbar (theta - theta0)^2)

with ``Fbar`` the diagonal empirical Fisher of the original layer on D_v, written as
``optax.chain(fisher_anchor, natural_gradient, scale(-alpha))``. **Choice**: the
preconditioner also holds the anchor's own curvature, ``(F + eta_r diag(Fbar) + lambda I)``
(``anchor_curvature``). Without it the anchor's gradient is amplified by up to
``alpha eta_r Fbar_j / lambda`` wherever ``F`` is nearly singular and ``Fbar`` is not, and the
iteration diverges (measured on the digits CNN at SPEC's defaults); with it the anchor's step
factor is at most ``alpha``. **Choice**: a KL trust region (as in K-FAC, Martens and Grosse
2015): each update ``u`` is rescaled so that ``u^T F u / 2 <= kl_clip``. On a confident head
the softmax saturates, ``F`` collapses towards ``lambda I`` and the raw natural-gradient step
``alpha g / lambda`` grows until the weights run away; the trust region bounds the change of
the output distribution per step instead.

- Head (default): the penultimate features of the clean set are computed once, and ``F`` is the
  exact true Fisher of a dense softmax layer, ``mean_i (diag(p_i) - p_i p_i^T) kron
  (h_i h_i^T)`` with ``h_i = [features; 1]``, solved by Cholesky and refreshed every
  ``refresh_every`` steps (:func:`fippure.optim.natural_gradient`, dense mode). ``F`` is taken
  over the *whole* clean set (**choice**: a batch of 128 gives a Fisher of rank at most
  128 * (K - 1) = 1,152 for the 1,290 head parameters of PreAct-ResNet-18 width 16, and a
  stale rank-deficient factor amplifies the next batch's gradient by up to 1 / lambda).
  Features are of un-augmented images (**choice**: augmentation would need a forward pass per
  step).
- Any other layer (``layer="stage4_block2/conv2"``): ``F`` is the GGN (= true Fisher) of the
  batch as a matrix-free operator (:func:`fippure.curvature.make_ggn_operator`), solved by
  conjugate gradient; the batch is augmented.

No public code exists; the defaults are SPEC's **choice**: batch 128, 2000 steps, alpha 0.1,
lambda 1e-3, eta_r 1 (sweep alpha {0.01, 0.1}, lambda {1e-3, 1e-2}).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.tree_util import Partial
from jaxtyping import PRNGKeyArray

from fippure.config_checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, check_config
from fippure.curvature.fisher import empirical_fisher_diagonal
from fippure.curvature.probes import tree_dot
from fippure.curvature.products import make_ggn_operator
from fippure.data.pipeline import normalize, to_unit_range
from fippure.data.sources import ImageDataset
from fippure.errors import InvalidInputError
from fippure.losses import cross_entropy
from fippure.models.registry import Variables, features_and_logits
from fippure.optim.anchor import anchor_penalty, fisher_anchor
from fippure.optim.natural_gradient import natural_gradient
from fippure.purify.common import (
    SHARED_RULES,
    Observer,
    PurifyReport,
    clean_accuracy,
    clean_batch_size,
    compile_key,
    config_dict,
    defense_arguments,
    device_clean_set,
    device_variables,
    on_the_variables_device,
    run_steps,
    sample_clean_batch,
    tree_size,
    validate_clean_set,
)
from fippure.purify.resume import Checkpointing, run_fingerprint

#: Ranges of NGF's hyper-parameters.
NGF_RULES = SHARED_RULES | {
    "damping": POSITIVE,
    "refresh_every": AT_LEAST_ONE,
    "cg_maxiter": AT_LEAST_ONE,
    "kl_clip": NON_NEGATIVE,
}


@dataclasses.dataclass(frozen=True)
class NGFConfig:
    """NGF's hyper-parameters (SPEC section 5, **choice**).

    Attributes:
        steps: natural-gradient steps.
        batch_size: clean examples per step (capped at the clean-set size).
        learning_rate: alpha.
        damping: lambda in ``(F + lambda I)``.
        eta_r: strength of the Fisher anchor to the original layer.
        layer: '/'-joined module path of the trained layer (``head`` by default).
        solver: ``auto`` (Cholesky for a dense head, conjugate gradient otherwise),
            ``dense`` or ``cg``.
        refresh_every: recompute the Cholesky factor every this many steps (dense solver).
        cg_maxiter: conjugate-gradient iterations per step (cg solver).
        anchor_curvature: add ``eta_r * Fbar`` to the preconditioned curvature (**choice**).
        kl_clip: bound on ``u^T F u / 2`` per update (``None`` or 0 disables it).
        augment: random crop + flip (cg solver only; head features are computed once).
        log_every: host sync interval of the loss log.
    """

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 0.1
    damping: float = 1e-3
    eta_r: float = 1.0
    layer: str = "head"
    solver: Literal["auto", "dense", "cg"] = "auto"
    refresh_every: int = 10
    cg_maxiter: int = 20
    anchor_curvature: bool = True
    kl_clip: float | None = 1e-3
    augment: bool = True
    log_every: int = 100

    def __post_init__(self):
        check_config(self, NGF_RULES)


def _layer_path(params, layer: str) -> tuple[str, ...]:
    """The module path of ``layer``; one that is empty (the whole network), missing or ends
    at a parameter array instead of a layer is refused with the list of layers."""
    path = tuple(p for p in layer.split("/") if p)
    node = params
    for part in path:
        if not isinstance(node, dict | flax.core.FrozenDict) or part not in node:
            node = None
            break
        node = node[part]
    is_layer = isinstance(node, dict | flax.core.FrozenDict) and all(
        not isinstance(leaf, dict | flax.core.FrozenDict) for leaf in node.values()
    )
    if not path or not is_layer:
        known = sorted(
            {"/".join(p[:-1]) for p in traverse_util.flatten_dict(flax.core.unfreeze(params))}
        )
        raise InvalidInputError(
            f"no layer {layer!r} in the model (NGF trains one layer); layers: {', '.join(known)}"
        )
    return path


def _get(params, path):
    for part in path:
        params = params[part]
    return params


def _set(params, path, value):
    if not path:
        return value
    params = dict(params)
    params[path[0]] = _set(params[path[0]], path[1:], value)
    return params


def _check_head_gives_the_logits(model, variables, head, features, logits) -> None:
    """The dense solver trains ``head`` on the sown features as if its outputs were the
    model's logits. One line where they are not (a layer after the head, a temperature, a
    normalisation between the sown features and the head): NGF would silently minimise
    another network's loss. ``features`` and ``logits`` come from one forward pass, so only
    the head's own rounding separates them, in the least precise of the model's compute
    dtype, the features, the head and the BatchNorm statistics."""
    if jnp.ndim(features) != 2 or jnp.shape(features)[1] != jnp.shape(head["kernel"])[0]:
        raise InvalidInputError(
            f"NGF's dense solver needs the sown features to be the head's (n, "
            f"{jnp.shape(head['kernel'])[0]}) inputs, got {jnp.shape(features)}; use solver=cg"
        )
    logits = np.asarray(logits, np.float32)
    from_head = np.asarray(_head_logits(head, None, features), np.float32)
    dtypes = {jnp.result_type(features), jnp.result_type(head["kernel"])}
    dtypes |= {jnp.result_type(x) for x in jax.tree_util.tree_leaves(variables.get("batch_stats"))}
    if getattr(model, "dtype", None) is not None:
        dtypes.add(jnp.dtype(model.dtype))
    eps = max(float(jnp.finfo(d).eps) for d in dtypes if jnp.issubdtype(d, jnp.floating))
    tolerance = max(1e-3, 8 * eps)
    if from_head.shape != logits.shape or not np.allclose(
        from_head, logits, rtol=tolerance, atol=tolerance * max(1.0, np.abs(logits).max())
    ):
        raise InvalidInputError(
            "NGF's dense solver trains 'head' on the sown features as the model's last layer, "
            "but the head's outputs are not the model's logits (a layer after it, a "
            "temperature, a normalisation before it?); use solver=cg"
        )


def _head_logits(layer, frozen, h):
    """The dense head on penultimate features ``h`` (the dense solver's network)."""
    del frozen
    out = h @ layer["kernel"]
    return out + layer["bias"] if "bias" in layer else out


@dataclasses.dataclass(frozen=True)
class _LayerLogits:
    """The whole network's logits with the layer at ``path`` replaced (the CG solver's)."""

    model: nn.Module
    path: tuple[str, ...]

    def __call__(self, layer, frozen, x):
        params = _set(frozen["params"], self.path, layer)
        return self.model.apply({**frozen, "params": params}, x, train=False)


@dataclasses.dataclass(frozen=True)
class _PerExampleLoss:
    """``(frozen, layer, (x, y)) -> (n,)`` cross-entropies, for Fbar."""

    logits_fn: Callable

    def __call__(self, frozen, layer, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(self.logits_fn(layer, frozen, x), y)


def _optimizer(config: NGFConfig, solver: str, fisher_diag: Any, anchor_point: Any):
    """The Fisher anchor, the natural gradient, then the step size. The anchor's Fbar and theta0
    live in its state (set by ``init``); ``fisher_diag`` also feeds the natural gradient's
    diagonal, so the steps rebuild the chain from their arguments."""
    return optax.chain(
        fisher_anchor(fisher_diag, anchor_point, config.eta_r),
        natural_gradient(
            config.damping,
            solver,
            refresh_every=config.refresh_every,
            cg_maxiter=config.cg_maxiter,
            diagonal=jax.tree_util.tree_map(lambda f: config.eta_r * f, fisher_diag)
            if config.anchor_curvature
            else None,
        ),
        optax.scale(-config.learning_rate),
    )


#: The fields the step takes as static arguments of their own (``solver``, ``batch_size``) or
#: never reads: left out of its compilation key (:func:`compile_key`), so runs that differ only
#: in them share the compiled step. The learning rate, damping and eta_r stay in the key:
#: passed as traced scalars, they changed the step's rounding (XLA fuses a constant scale
#: differently), and with it every stored NGF result.
_HOISTED = ("solver", "batch_size", "steps", "layer", "log_every")


@functools.partial(
    jax.jit,
    static_argnames=("logits_fn", "config", "solver", "batch_size", "spec"),
    donate_argnums=0,
)
def _ngf_step(
    carry, key, data, labels, fisher_diag, layer0, frozen, *, logits_fn, config, solver,
    batch_size, spec,
):  # fmt: skip
    """One natural-gradient step on the chosen layer; the carry is donated."""
    layer, opt_state = carry
    tx = _optimizer(config, solver, fisher_diag, layer0)
    if solver == "dense":
        rows = jax.random.choice(key, labels.shape[0], (batch_size,), replace=False)
        x, y = data[rows], labels[rows]
    else:
        x, y = sample_clean_batch(key, data, labels, batch_size, spec, config.augment)

    def bound(layer, x):
        return logits_fn(layer, frozen, x)

    def loss_fn(layer):
        return cross_entropy(bound(layer, x), y)

    ce, grads = jax.value_and_grad(loss_fn)(layer)
    extras = (
        {"features": data, "logits": bound(layer, data)}
        if solver == "dense"
        else {"fvp_fn": make_ggn_operator(bound, layer, x)}
    )
    updates, opt_state = tx.update(grads, opt_state, layer, **extras)
    # the objective at the same iterate: CE and the anchor, whose gradient fisher_anchor adds
    anchor = anchor_penalty(config.eta_r, fisher_diag, layer, layer0)
    metrics = {"loss": ce + anchor, "ce": ce, "anchor": anchor}
    if config.kl_clip:
        fisher = make_ggn_operator(bound, layer, data if solver == "dense" else x)
        kl = 0.5 * tree_dot(updates, fisher(updates))
        scale = jnp.minimum(1.0, jnp.sqrt(config.kl_clip / jnp.maximum(kl, 1e-30)))
        updates = jax.tree_util.tree_map(lambda u: u * scale, updates)
        metrics["kl"], metrics["trust_scale"] = kl, scale
    return (optax.apply_updates(layer, updates), opt_state), metrics


@on_the_variables_device
def purify(
    model: nn.Module,
    variables: Variables,
    clean_set: ImageDataset,
    config: NGFConfig = NGFConfig(),
    key: PRNGKeyArray | None = None,
    *,
    progress: bool = True,
    observer: Observer | None = None,
    observe_every: int = 0,
    checkpointing: Checkpointing | None = None,
) -> tuple[dict, PurifyReport]:
    """NGF; returns ``(variables with the tuned layer, report)``."""
    started = time.perf_counter()
    validate_clean_set(clean_set, model, variables, train=False)  # eval mode only
    variables = device_variables(variables)
    key = defense_arguments("ngf", config, NGFConfig, key)
    params = flax.core.unfreeze(variables["params"])
    path = _layer_path(params, config.layer)
    layer0 = _get(params, path)
    is_head = (
        path == ("head",) and set(layer0) <= {"kernel", "bias"} and jnp.ndim(layer0["kernel"]) == 2
    )
    solver = config.solver if config.solver != "auto" else ("dense" if is_head else "cg")
    if solver == "dense" and not is_head:
        raise InvalidInputError(
            "the dense (Cholesky) solver needs layer='head', a dense layer with a 2-D kernel; "
            "use solver=cg"
        )
    batch_size = clean_batch_size(config.batch_size, clean_set)
    images, labels = device_clean_set(clean_set)
    spec = clean_set.spec
    inputs = normalize(to_unit_range(images), spec)

    # The frozen weights (cg), Fbar and theta0 enter the compiled step as arguments, not as
    # constants baked into the program, so every run of a configuration on an architecture
    # shares it.
    if solver == "dense":
        try:
            features, logits = features_and_logits(model, variables, inputs)
        except InvalidInputError as error:
            raise InvalidInputError(
                f"NGF's dense solver reads the head's inputs: {error} (or set solver=cg)"
            ) from None
        _check_head_gives_the_logits(model, variables, layer0, features, logits)
        frozen = None
        logits_fn = _head_logits
        fisher_inputs, data = features, features
    else:
        frozen = variables
        logits_fn = _LayerLogits(model, path)
        fisher_inputs, data = inputs, images  # the steps sample and augment uint8 images

    fisher_diag = empirical_fisher_diagonal(
        Partial(_PerExampleLoss(logits_fn), frozen),
        layer0,
        (fisher_inputs, labels),
        chunk_size=50,
        share_compilation=True,
    )
    step = functools.partial(
        _ngf_step,
        logits_fn=logits_fn,
        config=compile_key(config, *_HOISTED),
        solver=solver,
        batch_size=batch_size,
        spec=spec,
    )

    def to_variables(carry):
        return {**variables, "params": _set(params, path, carry[0])}

    carry = (layer0, _optimizer(config, solver, fisher_diag, layer0).init(layer0))
    carry, curve, step_time, observe_time, resumed, done = run_steps(
        lambda c, k: step(c, k, data, labels, fisher_diag, layer0, frozen),
        carry,
        steps=config.steps,
        key=key,
        desc="NGF",
        progress=progress,
        log_every=config.log_every,
        observer=observer,
        observe_every=observe_every,
        to_variables=to_variables,
        checkpointing=checkpointing,
        fingerprint=lambda: run_fingerprint("ngf", model, config, variables, images, labels, key),
    )
    out = to_variables(carry)
    report = PurifyReport(
        method="ngf",
        config=config_dict(config),
        steps=done,
        wall_time_s=time.perf_counter() - started - observe_time,
        step_time_s=step_time,
        resumed_from_step=resumed,
        tunable_parameters=tree_size(layer0),
        batch_size=batch_size,
        loss_curve=curve,
        clean_accuracy=clean_accuracy(model, out, clean_set),
        extra={"solver": solver, "layer": "/".join(path)},
    )
    return out, report
