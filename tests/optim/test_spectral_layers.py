"""Which layers' input axes the spectral reparameterisation finds."""

from __future__ import annotations

import flax.linen as nn
import jax

from fippure.optim import spectral


class _Batched(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        plain = nn.DenseGeneral(features=(2, 3), axis=-1, name="plain")(x)
        batched = nn.DenseGeneral(features=3, axis=-1, batch_dims=(0,), name="batched")(x)
        return plain.reshape(x.shape[0], -1).sum(-1) + batched.sum((1, 2))


def test_layer_input_axes_skips_a_dense_general_with_batch_axes():
    model = _Batched()
    variables = model.init(jax.random.key(0), jax.numpy.zeros((1, 4, 5)))
    axes = spectral.layer_input_axes(model, variables, (4, 5))
    assert axes == {"plain/kernel": 1}
