"""A zero SAM radius (FT_RULES allow rho >= 0) is plain gradient descent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fippure.optim import adaptive_sam, asam_gradient


def test_a_zero_radius_gives_the_plain_gradient():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2)

    value, grads = asam_gradient(loss, params, rho=0.0, eta=0.0)
    np.testing.assert_allclose(value, loss(params))
    np.testing.assert_allclose(grads["w"], jax.grad(loss)(params)["w"])
    adaptive_sam(optax.sgd(0.1), rho=0.0, eta=0.0)  # accepted too
