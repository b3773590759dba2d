"""Fisher traces (differentiable, for FIP's smoothness penalty) and the exact Fisher diagonal.

SPEC section 2 (FIP, Karim et al., "Fisher Information guided Purification against Backdoor
Attacks", CCS 2024): the loss is ``CE + eta_F * Tr F + (eta_r / 2) sum_j Fbar_j (theta_j -
theta0_j)^2``.

- :func:`empirical_fisher_trace` is the ``Tr F`` term: ``Tr F = mean_i ||grad l_i||^2`` for the
  per-example log-likelihoods ``l_i``. With Rademacher probes ``v_k`` and ``u_k = J v_k`` (one
  ``jax.jvp`` of the *vector* of per-example losses, so no per-example gradient is formed),
  ``TrF_hat = mean_k mean_i u_ki^2`` is unbiased, because ``E[u_ki^2] = ||grad l_i||^2``. It is
  a smooth function of the parameters, so ``jax.grad`` differentiates it (reverse over
  forward).
- :func:`per_example_fisher_trace` is the same ``Tr F`` computed exactly from per-example
  gradients (no probes; cheap for Fast FIP's shifts in factored form), also differentiable.
- :func:`true_fisher_trace` is the variant with labels sampled from the model's own softmax
  (``y ~ p(.|x)``, drawn under ``stop_gradient``): an estimate of the true Fisher's trace.
- :func:`empirical_fisher_diagonal` is ``Fbar``: the exact diagonal ``mean_i (grad l_i)^2``
  from per-example gradients, vmapped over chunks of examples.

Apply BatchNorm in eval mode inside these functions (SPEC section 2, **choice**): in train mode
the examples of a batch couple through the batch statistics and "per-example" gradients lose
their meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial
from jaxtyping import Array, Float, PRNGKeyArray

from fippure.curvature.probes import map_probes, rademacher_like, widened
from fippure.curvature.products import LogitsFn, PerExampleLossFn, check_per_example_losses
from fippure.errors import InvalidInputError

PyTree = Any


def empirical_fisher_trace(
    per_example_loss_fn: PerExampleLossFn,
    params: PyTree,
    batch: Any,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, ""]:
    """The differentiable estimate ``TrF_hat = mean_k mean_i (J v_k)_i^2`` of ``Tr F_emp``.

    SPEC section 2's penalty: ``J`` is the Jacobian of the per-example losses, ``v_k`` are
    Rademacher probes, and each ``J v_k`` is a forward-mode product (the per-example losses are
    linearised once and the linearisation is shared by all probes). ``jax.grad`` of this
    function gives an unbiased estimate of ``grad Tr F_emp``.

    Args:
        per_example_loss_fn: ``(params, batch) -> (n,)`` per-example negative log-likelihoods
            (their sign does not matter here).
        params: the parameters (the differentiation variable).
        batch: the data the function reads (labels included).
        key: random key for the probes; use a fresh one every step.
        num_probes: K.
        vmap_probes: vectorise the probes with ``jax.vmap`` (tiny models, many probes); the
            default loop compiles and runs faster for convnets on XLA:CPU.

    Returns:
        The scalar estimate.
    """
    losses, jvp_fn = jax.linearize(lambda p: per_example_loss_fn(p, batch), params)
    check_per_example_losses(losses, "empirical_fisher_trace")

    def one(probe_key):
        return jnp.mean(widened(jvp_fn(rademacher_like(probe_key, params))) ** 2)

    return jnp.mean(map_probes(one, key, num_probes, vmap_probes))


def per_example_fisher_trace(
    per_example_loss_fn: PerExampleLossFn, params: PyTree, batch: Any
) -> Float[Array, ""]:
    """The exact ``Tr F_emp = mean_i ||grad l_i||^2`` from per-example gradients, differentiable.

    SPEC section 2's penalty without probes: each example's gradient is formed
    (``jax.vmap`` of ``jax.grad`` over batches of one example) and its squared norm taken, so
    the value has no Hutchinson noise and ``jax.grad`` of it (reverse over reverse) is the
    exact gradient of the batch's trace. Per-example gradients cost little when the tuned
    scalars act as channel scales, as Fast FIP's singular-value shifts do in factored form
    (:func:`fippure.optim.spectral.factored`): their gradient is a per-channel sum, and no
    kernel gradient is formed. For full weights they are batched kernel gradients, which
    :func:`empirical_fisher_trace` avoids.

    A batch sharded over devices is replicated first: XLA's partitioner gets the per-example
    gradients of a convolution wrong when the batch is split (jax 0.10.2: 5.66 against 9.70
    for a small CNN's batch of 40 split over four devices; jax-ml/jax#32157 is the same
    construction). Inside a jitted function of your own the batch is traced and cannot be
    checked: keep it replicated there.

    Args:
        per_example_loss_fn: ``(params, batch) -> (n,)``. It is called on batches of one
            example, so it must treat examples independently (BatchNorm in eval mode).
        params: the parameters (the differentiation variable).
        batch: a pytree whose leaves share a leading example axis.

    Returns:
        The scalar trace.

    Raises:
        InvalidInputError: a batch split over devices by a sharding other than a
            :class:`jax.sharding.NamedSharding` (which is replicated on its mesh instead).
    """
    _leading_size(batch)
    batch = _replicated(batch)
    check_per_example_losses(
        jax.eval_shape(per_example_loss_fn, params, batch), "per_example_fisher_trace"
    )

    grads = _per_example_gradients(per_example_loss_fn, params, batch)
    wide = [widened(g) for g in jax.tree_util.tree_leaves(grads)]
    squares = sum(jnp.sum((g * g).reshape(g.shape[0], -1), axis=1) for g in wide)
    return jnp.mean(squares)


def true_fisher_trace(
    logits_fn: LogitsFn,
    params: PyTree,
    batch: Any,
    key: PRNGKeyArray,
    num_probes: int = 1,
    *,
    vmap_probes: bool = False,
) -> Float[Array, ""]:
    """``TrF_hat`` with labels sampled from the model: an estimate of the true Fisher's trace.

    For each probe ``v_k``, labels ``y_ki ~ softmax(stop_gradient(logits_i))`` are drawn and
    ``u_ki = <grad log p(y_ki | x_i), v_k> = U_i[y_ki] - <p_i, U_i>`` with ``U = J_logits v_k``
    (forward mode, one shared linearisation); the estimate is ``mean_k mean_i u_ki^2``. Its
    expectation over labels and probes is ``Tr G`` (:func:`fippure.curvature.trace.ggn_trace`
    estimates the same trace without sampling labels, by the exact expectation over ``y``).

    ``jax.grad`` of it is an unbiased estimate of ``grad Tr G``: the labels' distribution
    depends on the parameters, so besides the gradient at fixed labels the estimate carries
    the score-function term ``u_ki^2 grad log p(y_ki | x_i)`` (Williams 1992), added through a
    surrogate whose value is zero. That term is noisy; :func:`~fippure.curvature.trace.ggn_trace`
    gives the same expectation and gradient with less variance.

    Args:
        logits_fn: ``(params, batch) -> (n, K)``.
        params: the parameters.
        batch: the data ``logits_fn`` reads (labels are not used).
        key: random key for the probes and the sampled labels.
        num_probes: K.
        vmap_probes: vectorise the probes with ``jax.vmap``.

    Returns:
        The scalar estimate.
    """
    logits, jvp_fn = jax.linearize(lambda p: logits_fn(p, batch), params)
    # in at least float32: bfloat16 Gumbel noise undersamples the unlikely labels (a trace
    # 12% low), and float16 squares overflow
    logits = widened(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    frozen = jax.lax.stop_gradient(logits)

    def one(probe_key):
        direction_key, label_key = jax.random.split(probe_key)
        tangents = widened(jvp_fn(rademacher_like(direction_key, params)))
        labels = jax.random.categorical(label_key, frozen)
        picked = jnp.take_along_axis(tangents, labels[..., None], axis=-1)[..., 0]
        squares = (picked - jnp.sum(probs * tangents, axis=-1)) ** 2
        # score-function surrogate: value 0, gradient u^2 grad log p(y | x) per example
        log_p = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        score = jax.lax.stop_gradient(squares) * (log_p - jax.lax.stop_gradient(log_p))
        return jnp.mean(squares + score)

    return jnp.mean(map_probes(one, key, num_probes, vmap_probes))


def _leading_size(batch: Any) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or any(jnp.ndim(leaf) == 0 for leaf in leaves):
        raise InvalidInputError(
            "batch must be a pytree of arrays with a leading example axis; got "
            f"{jax.tree_util.tree_map(jnp.shape, batch)}"
        )
    sizes = {jnp.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise InvalidInputError(f"batch leaves must share one leading size, got {sorted(sizes)}")
    size = sizes.pop()
    if size == 0:
        raise InvalidInputError("the batch is empty: the Fisher needs at least one example")
    return size


def _replicated(batch: Any) -> Any:
    """``batch`` with every leaf split over devices replicated on its mesh (a concrete array
    only; traced leaves are left as they are)."""

    def replicate(leaf):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            return leaf
        sharding = leaf.sharding
        if sharding.is_fully_replicated:
            return leaf
        if isinstance(sharding, jax.sharding.NamedSharding):
            whole = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            return jax.device_put(leaf, whole)
        raise InvalidInputError(
            "per_example_fisher_trace needs the batch whole on each device (XLA gets per-example "
            f"convolution gradients of a split batch wrong); got one split by {sharding}: "
            "replicate it first"
        )

    return jax.tree_util.tree_map(replicate, batch)


def as_partial(fn: Callable) -> Partial:
    """``fn`` as a :class:`jax.tree_util.Partial`, a pytree that a jitted function can take as
    an argument (a Partial's bound arrays are its leaves; anything else becomes one with none)."""
    return fn if isinstance(fn, Partial) else Partial(fn)


def _per_example_gradients(per_example_loss_fn, params, batch):
    """Each example's gradient, stacked on a leading axis: ``jax.vmap`` of ``jax.grad`` of the
    loss of a batch of one."""

    def single(p, example):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        return per_example_loss_fn(p, one)[0]

    return jax.vmap(jax.grad(single), in_axes=(None, 0))(params, batch)


def _chunk_squared_gradients(per_example_loss_fn, params, batch, rows, valid):
    chunk = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), batch)
    grads = _per_example_gradients(per_example_loss_fn, params, chunk)
    weights = valid.astype(jnp.result_type(*jax.tree_util.tree_leaves(params)))
    return jax.tree_util.tree_map(
        lambda g: jnp.tensordot(weights, (g * g).reshape(g.shape[0], -1), axes=1).reshape(
            g.shape[1:]
        ),
        grads,
    )


#: The compiled chunk of :func:`empirical_fisher_diagonal` for ``share_compilation=True``.
_shared_chunk_squared_gradients = jax.jit(_chunk_squared_gradients)


def empirical_fisher_diagonal(
    per_example_loss_fn: PerExampleLossFn,
    params: PyTree,
    batch: Any,
    *,
    chunk_size: int = 64,
    share_compilation: bool = False,
) -> PyTree:
    """The exact diagonal empirical Fisher ``Fbar = mean_i (grad l_i)^2`` (SPEC section 2).

    Per-example gradients are computed with ``jax.vmap`` over chunks of ``chunk_size`` examples
    (the last chunk is padded and masked, so every chunk reuses one compiled function), squared
    and summed, so memory holds one chunk of gradients at a time.

    Args:
        per_example_loss_fn: ``(params, batch) -> (n,)``. It is called on batches of one
            example, so it must treat examples independently (BatchNorm in eval mode). Arrays
            it needs besides ``params`` and ``batch`` (frozen weights, batch statistics) are
            best bound with :class:`jax.tree_util.Partial`: they then enter the compiled
            function as arguments, where a closure would bake them in as constants.
        params: where the Fisher is taken.
        batch: a pytree whose leaves share a leading example axis ``n``.
        chunk_size: examples per vmapped chunk.
        share_compilation: keep the compiled chunk in a module-level cache, so a later call
            with an equal loss function and the same shapes reuses it. Only for a loss function
            that is long-lived and compared by value (a module-level function, or a frozen
            dataclass of such things, bound with :class:`~jax.tree_util.Partial`): the cache
            holds it for the life of the process. By default the chunk is compiled per call.

    Returns:
        A pytree shaped like ``params``.
    """
    n = _leading_size(batch)
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be positive, got {chunk_size}")
    check_per_example_losses(
        jax.eval_shape(per_example_loss_fn, params, batch), "empirical_fisher_diagonal"
    )
    chunk_size = min(chunk_size, n)
    # compiled per call (once for all chunks), so no loss function outlives it in a jit cache;
    # the loss function travels as a pytree argument, so a Partial's arrays are not constants
    loss_fn = as_partial(per_example_loss_fn)
    chunk_fn = (
        _shared_chunk_squared_gradients if share_compilation else jax.jit(_chunk_squared_gradients)
    )
    total = None
    for start in range(0, n, chunk_size):
        index = start + jnp.arange(chunk_size)
        rows = jnp.minimum(index, n - 1)
        part = chunk_fn(loss_fn, params, batch, rows, index < n)
        total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
    return jax.tree_util.tree_map(lambda x: x / n, total)
