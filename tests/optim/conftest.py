"""Shared fixtures of the optimiser tests: float64 mode and orbax round trips."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest


@pytest.fixture(scope="module")
def x64():
    """float64 (and quick compiles) for a whole test module; restores the previous settings."""
    previous = jax.config.read("jax_enable_x64")
    optimizations = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_enable_x64", previous)
    jax.config.update("jax_disable_most_optimizations", optimizations)


def orbax_round_trip(tree, directory):
    """Saves ``tree`` with ``StandardCheckpointer`` under ``directory`` (absolute) and restores
    it into the same structure."""
    path = directory.resolve() / "state"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(path, jax.tree_util.tree_map(np.zeros_like, tree))


@pytest.fixture
def round_trip(tmp_path):
    """``tree -> restored tree`` through orbax in ``tmp_path``."""
    return lambda tree: orbax_round_trip(tree, tmp_path)
