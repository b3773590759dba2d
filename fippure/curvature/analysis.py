"""The curvature report of a trained classifier (what ``fippure analyze`` prints and saves).

SPEC section 8 (and FIP's Table 6): on one batch of clean training images, with the model in
eval mode and the loss the mean cross-entropy of that batch, report

- ``lambda_max``: the largest (algebraic) Hessian eigenvalue, by power iteration with a
  spectral shift (:func:`~fippure.curvature.eigenvalues.largest_eigenvalue`), cross-checked by
  the top Lanczos Ritz value (``lambda_max_lanczos`` and their relative difference
  ``lambda_max_disagreement``);
- ``Tr(H)``: Hutchinson's estimate with Rademacher probes (and its standard error);
- ``Tr(F)``: the trace of the empirical Fisher, exactly, as the sum of the per-example squared
  gradients (``Tr(G)``, the true Fisher's, is added by Hutchinson from jvps);
- the top-k eigenvalues (Lanczos Ritz values of the first SLQ probe);
- the spectral density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

All Hessian products reuse one linearisation of the gradient
(:func:`~fippure.curvature.products.make_hvp_operator`), built once (the factory is jitted).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from fippure.config_checks import AT_LEAST_ONE, POSITIVE, check_config
from fippure.curvature.density import SpectralDensity, spectral_density
from fippure.curvature.eigenvalues import largest_eigenvalue
from fippure.curvature.fisher import empirical_fisher_diagonal
from fippure.curvature.products import make_hvp_operator
from fippure.curvature.trace import ggn_trace_samples, hutchinson_samples
from fippure.errors import InvalidInputError
from fippure.models.contract import check_logits, check_train_keyword

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """How hard :func:`analyze_curvature` works.

    Attributes:
        hutchinson_probes: Rademacher probes for ``Tr(H)`` and ``Tr(G)``.
        probe_chunk: probes per compiled call (a loop inside one jit; compile time grows
            with it). A count that is no multiple of it runs its last chunk whole and drops
            the surplus (at most ``probe_chunk - 1`` probes' work, instead of a compile).
        power_iters: maximum power-iteration steps for ``lambda_max``, per run: where
            negative eigenvalues dominate, a second run on the shifted operator follows
            (:func:`~fippure.curvature.largest_eigenvalue`), up to ``2 power_iters + 1``
            products in all.
        power_tol: relative tolerance that stops power iteration.
        lanczos_iters: Lanczos steps per SLQ probe (also gives the top-k eigenvalues).
        slq_probes: SLQ probes for the spectral density.
        top_k: number of top eigenvalues reported.
        fisher_chunk: examples per vmapped chunk for the exact Fisher trace.
    """

    hutchinson_probes: int = 20
    probe_chunk: int = 2
    power_iters: int = 50
    power_tol: float = 1e-3
    lanczos_iters: int = 40
    slq_probes: int = 2
    top_k: int = 5
    fisher_chunk: int = 50

    def __post_init__(self):
        counts = ("hutchinson_probes", "probe_chunk", "power_iters", "lanczos_iters",
                  "slq_probes", "top_k", "fisher_chunk")  # fmt: skip
        check_config(self, dict.fromkeys(counts, AT_LEAST_ONE) | {"power_tol": POSITIVE})
        if self.top_k > self.lanczos_iters:
            raise InvalidInputError(
                f"AnalysisConfig.top_k ({self.top_k}) must not exceed lanczos_iters "
                f"({self.lanczos_iters}): Lanczos finds at most that many eigenvalues"
            )


#: Jitted pieces of the analysis, shared by every call (the functions they take are static).
_hessian_samples = jax.jit(hutchinson_samples, static_argnums=3)
_ggn_samples = jax.jit(ggn_trace_samples, static_argnums=(0, 4))


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn, params, batch):
    return fn(params, batch)


def _cross_entropy_functions(model: nn.Module) -> tuple[Callable, Callable, Callable]:
    """``(logits_fn, per_example_loss_fn, loss_fn)`` of ``model`` in eval mode, each taking
    ``(params, (inputs, labels, other_collections))``.

    The same (equal, hashable) model gets the same functions, so the jit caches keyed on them
    (the Hessian's linearisation and the probes' compiled loops) serve a second checkpoint of
    that architecture without compiling again: before and after a defense, say.
    """
    if _hashable(model):
        return _cached_cross_entropy_functions(model)
    # an unhashable module: fresh functions, compiled for this call
    return _cached_cross_entropy_functions.__wrapped__(model)


@functools.lru_cache(maxsize=8)
def _cached_cross_entropy_functions(model: nn.Module) -> tuple[Callable, Callable, Callable]:
    def logits_fn(p, batch):
        inputs, _, others = batch
        return model.apply({**others, "params": p}, inputs, train=False)

    def per_example_loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, batch), batch[1])

    def loss_fn(p, batch):
        return jnp.mean(per_example_loss_fn(p, batch))

    return logits_fn, per_example_loss_fn, loss_fn


@dataclasses.dataclass(frozen=True)
class _WithCollections:
    """``fn(params, (*data, others))``: a loss on ``(inputs, labels)`` with the collections
    bound (as a :class:`jax.tree_util.Partial` argument, not a baked-in constant)."""

    fn: Callable

    def __call__(self, others: PyTree, params: PyTree, data: tuple) -> Array:
        return self.fn(params, (*data, others))


def _hashable(model: nn.Module) -> bool:
    try:
        hash(model)
    except TypeError:
        return False
    return True


def _chunked_samples(sample_fn, key: PRNGKeyArray, total: int, chunk: int) -> np.ndarray:
    """Per-probe samples from ``sample_fn(key, num_probes)`` in chunks of ``chunk`` probes.

    Every call draws ``min(chunk, total)`` probes, so a count that is no multiple of the chunk
    compiles no second program: the last chunk's surplus samples are dropped. Its probes are
    the ones a chunk of the remaining size would draw, since a key split in ``m`` is the first
    ``m`` of one split in more (``jax_threefry_partitionable``, JAX's default)."""
    chunk = min(chunk, total)
    out, start = [], 0
    while start < total:
        size = min(chunk, total - start)
        out.append(np.asarray(sample_fn(jax.random.fold_in(key, start), chunk))[:size])
        start += size
    return np.concatenate(out)


def analyze_curvature(
    model: nn.Module,
    variables: PyTree,
    inputs: Float[Array, "n h w c"],
    labels: Int[Array, " n"],
    key: PRNGKeyArray,
    config: AnalysisConfig = AnalysisConfig(),
) -> tuple[dict[str, Any], SpectralDensity]:
    """Curvature of the mean cross-entropy on ``(inputs, labels)`` at ``variables``.

    Args:
        model: the Flax classifier (applied with ``train=False``).
        variables: ``{'params', 'batch_stats'}``; curvature is w.r.t. ``params``.
        inputs: normalised model inputs.
        labels: their labels.
        key: random key for all probes.
        config: see :class:`AnalysisConfig`.

    Returns:
        ``(report, density)``: a JSON-able dict and the :class:`SpectralDensity`.

    Raises:
        InvalidInputError: a model whose ``__call__`` takes no ``train`` keyword or that
            returns more than one logits array, or variables without ``params``.
    """
    check_train_keyword(model, "analyze_curvature")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise InvalidInputError("variables must be the model's collections, with 'params'")
    probe = jax.ShapeDtypeStruct((1, *jnp.shape(inputs)[1:]), jnp.result_type(inputs))
    check_logits(
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, probe),
        "analyze_curvature",
    )
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}
    inputs, labels = jnp.asarray(inputs), jnp.asarray(labels)
    # the batch statistics travel with the data, so the loss functions depend on the model alone
    # and every compiled piece below is reused by the next analysis of the same architecture
    batch = (inputs, labels, others)
    logits_fn, per_example_loss_fn, loss_fn = _cross_entropy_functions(model)

    timings = {}
    keys = dict(zip(("power", "trace", "ggn", "slq"), jax.random.split(key, 4), strict=True))
    start = time.perf_counter()
    logits = _apply(logits_fn, params, batch)
    loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    operator = make_hvp_operator(loss_fn, params, batch)  # jitted, static loss_fn
    timings["linearize_s"] = time.perf_counter() - start

    start = time.perf_counter()
    power = largest_eigenvalue(
        operator, params, keys["power"], config.power_iters, config.power_tol
    )
    timings["power_iteration_s"] = time.perf_counter() - start

    start = time.perf_counter()
    trace_samples = _chunked_samples(
        lambda k, size: _hessian_samples(operator, params, k, size),
        keys["trace"],
        config.hutchinson_probes,
        config.probe_chunk,
    )
    timings["hutchinson_hessian_s"] = time.perf_counter() - start

    start = time.perf_counter()
    ggn_samples = _chunked_samples(
        lambda k, size: _ggn_samples(logits_fn, params, batch, k, size),
        keys["ggn"],
        config.hutchinson_probes,
        config.probe_chunk,
    )
    timings["hutchinson_ggn_s"] = time.perf_counter() - start

    start = time.perf_counter()
    # per-example gradients slice every leaf of the batch, so the statistics are bound instead
    # (a loss function cached per model is long-lived, so its compiled pass can be shared)
    fisher_loss = jax.tree_util.Partial(_WithCollections(per_example_loss_fn), others)
    fisher_diag = empirical_fisher_diagonal(
        fisher_loss,
        params,
        (inputs, labels),
        chunk_size=config.fisher_chunk,
        share_compilation=_hashable(model),
    )
    trace_fisher = float(sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(fisher_diag)))
    timings["exact_fisher_trace_s"] = time.perf_counter() - start

    start = time.perf_counter()
    density = spectral_density(
        operator,
        params,
        keys["slq"],
        num_iters=config.lanczos_iters,
        num_probes=config.slq_probes,
    )
    timings["slq_s"] = time.perf_counter() - start
    ritz = np.sort(np.asarray(density.nodes[0]))[::-1]

    num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    report = {
        "num_images": int(labels.shape[0]),
        "num_params": num_params,
        "loss": loss,
        "batch_accuracy": accuracy,
        "lambda_max": float(power.eigenvalue),
        "lambda_max_power_iters": int(power.num_iters),
        "lambda_max_relative_change": float(power.relative_change),
        "lambda_max_lanczos": float(ritz[0]),
        "lambda_max_disagreement": abs(float(power.eigenvalue) - float(ritz[0]))
        / max(abs(float(ritz[0])), 1e-30),
        "trace_hessian": float(np.mean(trace_samples)),
        "trace_hessian_stderr": float(np.std(trace_samples, ddof=1) / np.sqrt(len(trace_samples)))
        if len(trace_samples) > 1
        else float("nan"),
        "trace_empirical_fisher": trace_fisher,
        "trace_ggn": float(np.mean(ggn_samples)),
        "trace_ggn_stderr": float(np.std(ggn_samples, ddof=1) / np.sqrt(len(ggn_samples)))
        if len(ggn_samples) > 1
        else float("nan"),
        "top_eigenvalues": [float(x) for x in ritz[: config.top_k]],
        "density": {
            "sigma": float(density.sigma),
            "nodes": np.asarray(density.nodes).tolist(),
            "weights": np.asarray(density.weights).tolist(),
            "mean": float(density.mean()),
            "trace_over_p": float(np.mean(trace_samples)) / num_params,
        },
        "config": dataclasses.asdict(config),
        "timings_s": timings,
    }
    return report, density


#: Relative difference between power iteration's ``lambda_max`` and Lanczos's top Ritz value
#: above which :func:`lambda_max_warnings` speaks up (**choice**).
LAMBDA_MAX_DISAGREEMENT = 0.05


def lambda_max_warnings(report: dict, config: AnalysisConfig) -> list[str]:
    """One line per sign that a report's ``lambda_max`` is not to be trusted: power iteration
    stopped at ``power_iters`` before its relative change fell below ``power_tol``, or its
    value and the top Lanczos Ritz value differ by more than :data:`LAMBDA_MAX_DISAGREEMENT`
    (either may be short of converged; both grow towards ``lambda_max`` with more steps).

    Args:
        report: a report of :func:`analyze_curvature` (its ``lambda_max``,
            ``lambda_max_power_iters``, ``lambda_max_relative_change``, ``lambda_max_lanczos``
            and ``lambda_max_disagreement`` are read).
        config: the :class:`AnalysisConfig` the report was made with.

    Returns:
        The warnings, one line each; empty when both checks pass.
    """
    lines = []
    if not report["lambda_max_relative_change"] < config.power_tol:
        lines.append(
            f"lambda_max {report['lambda_max']:.4g} did not converge in "
            f"{report['lambda_max_power_iters']} operator products (power iteration, "
            f"{config.power_iters} steps per run; relative change "
            f"{report['lambda_max_relative_change']:.2g} >= power_tol {config.power_tol:g}); "
            "raise power_iters (--power-iters)"
        )
    if not report["lambda_max_disagreement"] <= LAMBDA_MAX_DISAGREEMENT:
        lines.append(
            f"power iteration's lambda_max {report['lambda_max']:.4g} and Lanczos's top Ritz "
            f"value {report['lambda_max_lanczos']:.4g} differ by "
            f"{100 * report['lambda_max_disagreement']:.0f}%; raise power_iters and "
            "lanczos_iters (--power-iters, --lanczos-iters)"
        )
    return lines


def plot_density(
    density: SpectralDensity, path: str | os.PathLike, title: str | None = None
) -> None:
    """Saves the spectral density as a PNG (log-scale density, as in Ghorbani et al.).

    Args:
        density: the :class:`SpectralDensity` to draw (its ``grid`` and ``density``).
        path: the file to write (matplotlib takes the format from its suffix).
        title: a title above the plot; ``None`` or empty for none.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, values = np.asarray(density.grid), np.asarray(density.density)
    floor = max(values.max() * 1e-12, np.finfo(np.float64).tiny)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(grid, np.maximum(values, floor), lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (Gaussian-smoothed SLQ)")
    ax.set_ylim(bottom=max(floor, values.max() * 1e-8))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
