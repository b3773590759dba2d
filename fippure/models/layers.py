"""Building blocks shared by the models."""

from __future__ import annotations

import functools

import flax.linen as nn

#: BatchNorm as in PyTorch (momentum 0.1 there is 0.9 here; eps 1e-5).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

FEATURES = "features"
"""Name under which every model sows its penultimate features in ``intermediates``."""
