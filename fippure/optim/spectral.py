"""Spectral (singular-value shift) reparameterisation of conv and dense kernels for Fast FIP.

SPEC section 3 (Fast FIP, Karim et al., CCS 2024; the same reparameterisation as SVD-based
fine-tuning with singular-value shifts): every selected kernel, reshaped to a matrix ``W``, is
factored once as ``W = U diag(s) V^T`` (thin SVD) and only a shift ``d`` per singular value is
trained:

    W(d) = U diag(relu(s + d)) V^T,    d initialised to 0, so W(0) = W.

``U``, ``s``, ``V^T`` are frozen and held in a pytree of their own (:func:`decompose`). A
network is evaluated at ``(factors, shifts)`` in one of two forms:

- **rebuilt** (:func:`rebuild_params`): ``W(d)`` is formed and the layer runs as usual;
- **factored** (:func:`factored`): a ``flax.linen`` method interceptor runs each decomposed
  ``nn.Conv`` / ``nn.Dense`` as ``((x * U) * relu(s + d)) V^T``: a convolution (or matmul) with
  the frozen ``U``, a per-channel scale, and a matmul with the frozen ``V^T``. The result is the
  same up to rounding, but no kernel is ever a function of ``d``, so reverse mode computes no
  kernel gradients (only input gradients and the cheap gradient of a channel scale), and a
  tangent in ``d`` costs one convolution per layer instead of two. On PreAct-ResNet-18 this
  halves the cost of a Fast FIP step (``experiments/results/fast_fip_speed.md``).

**Layout.** Flax convolution kernels are HWIO ``(kh, kw, in, out)`` and dense kernels are
``(in, out)``. Both are reshaped to ``(kh * kw * in, out)`` (row-major, the output channel last),
i.e. the transpose of SPEC's ``c_out x rest``; singular values are the same either way. A
kernel of that matrix shape ``(m, out)`` gets ``r = min(m, out)`` shifts. For convolutions,
dense layers and an attention block's output projection ``(heads, head_dim, out)`` that matrix
is the layer's linear map. A ``DenseGeneral`` kernel with several *output* axes (an attention
block's query, key and value, ``(in, heads, head_dim)``) maps ``in`` to ``heads * head_dim``,
and the shape alone cannot tell that layout from the output projection's. :func:`layer_input_axes`
reads each ``DenseGeneral``'s contracted axes from the model; given to :func:`decompose`, they
make every kernel's matrix the layer's map, so the singular values are the layer's (Fast FIP
does this). Without them, all but a kernel's last axis are taken as its inputs. A grouped or
depthwise convolution (``feature_group_count > 1``) is the exception: its ``(kh * kw * in /
groups, out)`` matrix stacks the groups' maps side by side, not the layer's block-diagonal
map, so its singular values are that matrix's (zero shifts still give back the layer exactly).

Shifts and factors are nested dicts containing only the decomposed kernels, keyed like the
params (e.g. ``shifts['stage1_block1']['conv1']['kernel']``), so they save with orbax and feed
``optax`` directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jaxtyping import Array, Float

from fippure.config_checks import compile_pattern
from fippure.errors import InvalidInputError

PyTree = Any

#: Default selection: every ``kernel`` leaf (all convolutions and dense layers, head included).
KERNEL_PATTERN = r"(^|/)kernel$"


@flax.struct.dataclass
class SpectralFactor:
    """The frozen thin SVD of one kernel.

    Attributes:
        u: ``(m, r)`` left singular vectors (``m``: the layer's inputs, see :func:`as_matrix`).
        s: ``(r,)`` singular values (descending).
        vt: ``(r, out)`` right singular vectors, transposed (``out``: its outputs).
        shape: the kernel's original shape (static).
    """

    u: Float[Array, "m r"]
    s: Float[Array, " r"]
    vt: Float[Array, "r o"]
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)


def _path_string(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _flat_params(params: PyTree) -> dict[tuple[str, ...], Any]:
    if not isinstance(params, dict | flax.core.FrozenDict):
        raise InvalidInputError("spectral reparameterisation expects Flax params (nested dicts)")
    return traverse_util.flatten_dict(flax.core.unfreeze(params))


def as_matrix(kernel: Array, input_axes: int | None = None) -> Array:
    """A kernel as the matrix of its layer's map: its first ``input_axes`` axes (default: all
    but the last) are the rows, the rest the columns (HWIO -> (H*W*I, O))."""
    input_axes = kernel.ndim - 1 if input_axes is None else input_axes
    return kernel.reshape(math.prod(kernel.shape[:input_axes]), -1)


def layer_input_axes(
    model: nn.Module, variables: PyTree, image_shape: tuple[int, ...]
) -> dict[str, int]:
    """How many leading axes of each ``nn.DenseGeneral`` kernel are its layer's inputs, keyed by
    the kernel's '/'-joined path (e.g. ``block1/attention/query/kernel``: 1). Found by tracing
    ``model`` on shapes only (nothing is computed).

    Args:
        model: the Flax module.
        variables: its collections (only their shapes are read).
        image_shape: ``(height, width, channels)`` of one input image.

    Returns:
        ``{kernel path: input axes}`` for every ``nn.DenseGeneral`` without batch axes; empty
        for a model without one.
    """
    found: dict[str, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if type(module) is nn.DenseGeneral and context.method_name == "__call__":
            if not module.batch_dims:  # batch axes would lead the kernel: keep the default
                axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
                found[_path_string((*module.path, "kernel"))] = len(axis)
        return next_fun(*args, **kwargs)

    probe = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, probe)
    return found


def decompose(
    params: PyTree,
    pattern: str = KERNEL_PATTERN,
    *,
    input_axes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Thin SVD of every kernel whose '/'-joined path matches ``pattern``.

    Args:
        params: Flax params (nested dicts).
        pattern: regular expression searched in paths such as ``stage1_block1/conv1/kernel``;
            only leaves with at least two dimensions are decomposed.
        input_axes: for kernels whose layer's inputs are not all but the last axis, the
            number of leading input axes, by path (:func:`layer_input_axes`).

    Returns:
        A nested dict of :class:`SpectralFactor` with the params' keys (selected kernels only).

    Raises:
        InvalidInputError: when nothing matches.
    """
    regex = compile_pattern(pattern)
    input_axes = input_axes or {}
    factors = {}
    for path, leaf in _flat_params(params).items():
        if jnp.ndim(leaf) >= 2 and regex.search(_path_string(path)):
            matrix = as_matrix(leaf, input_axes.get(_path_string(path)))
            # the SVD runs in at least float32 (there is none in bfloat16); the factors keep
            # the kernel's dtype
            wide = matrix.astype(jnp.promote_types(leaf.dtype, jnp.float32))
            u, s, vt = (x.astype(leaf.dtype) for x in jnp.linalg.svd(wide, full_matrices=False))
            factors[path] = SpectralFactor(u, s, vt, tuple(leaf.shape))
    if not factors:
        kernels = [
            _path_string(path) for path, leaf in _flat_params(params).items() if jnp.ndim(leaf) >= 2
        ]
        shown = ", ".join(kernels[:4]) + (" ..." if len(kernels) > 4 else "")
        raise InvalidInputError(
            f"no kernel matches the pattern {pattern!r} (Fast FIP's kernel_pattern); this "
            f"model's kernels: {shown or 'none'}"
        )
    return traverse_util.unflatten_dict(factors)


def _is_factor(x: Any) -> bool:
    return isinstance(x, SpectralFactor)


def _flat_factors(factors: PyTree) -> dict[tuple[str, ...], SpectralFactor]:
    flat = traverse_util.flatten_dict(
        flax.core.unfreeze(factors), is_leaf=lambda _, x: _is_factor(x)
    )
    wrong = sorted(_path_string(p) for p, f in flat.items() if not _is_factor(f))
    if wrong:
        raise InvalidInputError(
            f"factors must come from spectral.decompose (SpectralFactor leaves); "
            f"{', '.join(wrong[:3])} {'is' if len(wrong) == 1 else 'are'} not"
        )
    return flat


def _checked_shifts(
    flat_factors: dict[tuple[str, ...], SpectralFactor], shifts: PyTree
) -> dict[tuple[str, ...], Array]:
    """The flattened shifts, one ``(r,)`` vector per factor (a clear error otherwise)."""
    flat_shifts = traverse_util.flatten_dict(flax.core.unfreeze(shifts))
    missing = sorted(_path_string(p) for p in set(flat_factors) - set(flat_shifts))
    if missing:
        raise InvalidInputError(
            f"no spectral shift for the decomposed kernel(s) {', '.join(missing)}"
        )
    for path, factor in flat_factors.items():
        if jnp.shape(flat_shifts[path]) != factor.s.shape:
            raise InvalidInputError(
                f"the shift of {_path_string(path)} has shape {jnp.shape(flat_shifts[path])}, "
                f"its factor has {factor.s.shape[0]} singular values; were the shifts made "
                "for another model's factors?"
            )
    return flat_shifts


def init_shifts(factors: PyTree) -> dict[str, Any]:
    """Zero shifts, one ``(r,)`` array per decomposed kernel (same nesting as ``factors``).

    Args:
        factors: from :func:`decompose`.

    Returns:
        Nested dicts like ``factors``, with zeros of each factor's ``s`` shape and dtype.

    Raises:
        InvalidInputError: a leaf of ``factors`` that is not a :class:`SpectralFactor`.
    """
    return jax.tree_util.tree_map(jnp.zeros_like, _map_factors(factors, lambda f: f.s))


def _map_factors(factors, fn):
    flat = _flat_factors(factors)
    return traverse_util.unflatten_dict({path: fn(f) for path, f in flat.items()})


def rebuild_kernel(factor: SpectralFactor, shift: Float[Array, " r"]) -> Array:
    """``U diag(relu(s + d)) V^T`` reshaped to the kernel's original shape.

    Args:
        factor: the kernel's :class:`SpectralFactor`.
        shift: ``d``, one shift per singular value.

    Returns:
        ``W(d)``, of shape ``factor.shape``.
    """
    values = jax.nn.relu(factor.s + shift)
    return ((factor.u * values) @ factor.vt).reshape(factor.shape)


def rebuild_params(params: PyTree, factors: PyTree, shifts: PyTree) -> dict[str, Any]:
    """``params`` with every decomposed kernel replaced by ``W(d)`` (differentiable in ``d``).

    Args:
        params: the original Flax params (non-decomposed leaves are kept).
        factors: from :func:`decompose`.
        shifts: from :func:`init_shifts` (or trained).

    Returns:
        New params (nested dicts).
    """
    flat = _flat_params(params)
    flat_factors = _flat_factors(factors)
    flat_shifts = _checked_shifts(flat_factors, shifts)
    for path, factor in flat_factors.items():
        if path not in flat:
            raise InvalidInputError(f"factor {_path_string(path)} has no kernel in params")
        if tuple(flat[path].shape) != factor.shape:
            raise InvalidInputError(
                f"factor {_path_string(path)} is of a {factor.shape} kernel, the params' is "
                f"{tuple(flat[path].shape)}; decompose these params instead"
            )
        flat[path] = rebuild_kernel(factor, flat_shifts[path]).astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def shift_counts(factors: PyTree) -> dict[str, int]:
    """The number of shifts of each decomposed kernel, keyed by its '/'-joined path.

    Args:
        factors: from :func:`decompose`.

    Returns:
        ``{path: r}``, e.g. ``{"stage1_block1/conv1/kernel": 64}``.

    Raises:
        InvalidInputError: a leaf of ``factors`` that is not a :class:`SpectralFactor`.
    """
    return {_path_string(path): int(f.s.shape[0]) for path, f in _flat_factors(factors).items()}


def num_shifts(factors: PyTree) -> int:
    """The total number of tunable shifts (about 4.3k for PreAct-ResNet-18 width 64).

    Args:
        factors: from :func:`decompose`.

    Returns:
        The sum of ``r`` over the decomposed kernels.

    Raises:
        InvalidInputError: a leaf of ``factors`` that is not a :class:`SpectralFactor`.
    """
    return sum(shift_counts(factors).values())


def _factorable(module: nn.Module, factor: SpectralFactor, inputs: Array) -> bool:
    """Whether ``module``'s call can run in factored form: a plain ``nn.Conv`` (no feature
    groups, no mask) or ``nn.Dense`` whose kernel has the factor's shape."""
    in_features = jnp.shape(inputs)[-1]
    if type(module) is nn.Conv:
        size = module.kernel_size
        kernel_size = (size,) if isinstance(size, int) else tuple(size)
        return (
            module.feature_group_count == 1
            and module.mask is None
            and factor.shape == (*kernel_size, in_features, module.features)
        )
    if type(module) is nn.Dense:
        return factor.shape == (in_features, module.features)
    return False


@contextlib.contextmanager
def factored(factors: PyTree, shifts: PyTree) -> Iterator[None]:
    """Evaluates decomposed layers in factored form inside the ``with`` block.

    Within the block, a call of a plain ``nn.Conv`` or ``nn.Dense`` whose kernel path (for
    example ``stage1_block1/conv1/kernel``) is in ``factors`` returns

        ((x * U) * relu(s + d)) @ V^T  (+ bias),

    where ``x * U`` is the layer's own convolution (same strides, padding, dilation) with the
    ``(kh, kw, in, r)`` kernel ``U`` (for a dense layer, a matmul). That equals the layer with
    kernel ``W(d) = U diag(relu(s + d)) V^T`` (:func:`rebuild_kernel`) up to rounding, without
    forming ``W(d)``, so its reverse and tangent passes skip the kernel (see the module
    docstring). Every other layer, including a decomposed kernel of another layer type
    (``DenseGeneral``, a grouped convolution), runs unchanged and reads its kernel from the
    params, so pass params from :func:`rebuild_params`: under ``jax.jit`` the rebuilt kernels
    that no layer reads are dropped as dead code.

    Example::

        params = rebuild_params(variables["params"], factors, shifts)
        with factored(factors, shifts):
            logits = model.apply({**variables, "params": params}, images)

    The interception happens while ``model.apply`` runs (at trace time under ``jax.jit``), and
    the shifts are those given here. So enter the block *inside* the transformed function, with
    the shifts it receives (as above, in a function of ``shifts`` that you jit or
    differentiate). A block around ``jax.grad(f)`` or around a jitted ``f`` would bake its own
    shifts into the trace and ignore ``f``'s argument; that is refused with an error when the
    layer's kernel is traced and its shift is not. Likewise, the compiled function keeps the
    factored form after the block exits: jit a function that enters the block itself.

    Args:
        factors: from :func:`decompose`.
        shifts: ``d``, one ``(r,)`` array per factor, nested like ``factors``.

    Yields:
        None.

    Raises:
        InvalidInputError: factors that are not :class:`SpectralFactor` leaves, shifts that
            are missing or of another shape, or (inside the block) a traced kernel whose shift
            is a fixed array.
    """
    flat = _flat_factors(factors)
    flat_shifts = _checked_shifts(flat, shifts)
    inside = [False]  # the U-convolution below is itself an nn.Conv call: do not intercept it

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if inside[0] or context.method_name != "__call__" or len(args) + len(kwargs) != 1:
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else next(iter(kwargs.values()))
        path = (*module.path, "kernel")
        factor = flat.get(path)
        if factor is None or not _factorable(module, factor, inputs):
            return next_fun(*args, **kwargs)
        shift = flat_shifts[path]
        if module.has_variable("params", "kernel"):
            kernel = module.get_variable("params", "kernel")
            if isinstance(kernel, jax.core.Tracer) and not isinstance(shift, jax.core.Tracer):
                raise InvalidInputError(
                    f"factored(): the kernel of {'/'.join(module.path)} is traced (jit, grad or "
                    "vmap) but its shift is a fixed array, so the result would ignore the "
                    "traced values; enter the `with factored(factors, shifts)` block inside "
                    "the transformed function, with the shifts it receives"
                )
        rank = factor.s.shape[0]
        projection = module.clone(parent=None, features=rank, use_bias=False)
        inside[0] = True
        try:
            z = projection.apply(
                {"params": {"kernel": factor.u.reshape(*factor.shape[:-1], rank)}}, inputs
            )
        finally:
            inside[0] = False
        values = jax.nn.relu(factor.s + shift)
        y = jnp.matmul(
            z * values.astype(z.dtype), factor.vt.astype(z.dtype), precision=module.precision
        )
        if module.use_bias:
            y = y + module.get_variable("params", "bias").astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield
