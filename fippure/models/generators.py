"""Small image-to-image networks that learned backdoor attacks train (not classifiers).

- :class:`ConvAutoencoder`: a conv encoder-decoder with skip connections, image -> map of the
  same height and width. Input-aware's pattern and mask generators and LIRA's perturbation
  generator are instances of it.
- :class:`StegaEncoder` / :class:`StegaDecoder`: a StegaStamp-style pair (Tancik et al., 2020)
  scaled down for 32x32 images: the encoder hides a bit string in an image as a residual, the
  decoder reads it back (ISSBA).

They have no BatchNorm, so applying them is a pure function of ``(params, inputs)``: a trigger
built on them is deterministic. They are kept small (tens of thousands of parameters) because
their parameters are saved with every backdoored checkpoint of the zoo.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _resize_to(x: Array, height: int, width: int) -> Array:
    """Nearest-neighbour resize of ``(b, h, w, c)`` to ``(b, height, width, c)``."""
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "nearest")


class ConvAutoencoder(nn.Module):
    """Conv encoder-decoder with additive skips; returns unbounded ``out_channels`` logits.

    The encoder halves the resolution once per entry of ``features`` after the first; the
    decoder resizes back to each skip's shape, so any image size works.

    Attributes:
        out_channels: channels of the output map.
        features: channels per resolution level, finest first.
    """

    out_channels: int
    features: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w o"]:
        h = nn.relu(nn.Conv(self.features[0], (3, 3), name="enc0")(x - 0.5))
        skips = [h]
        for i, width in enumerate(self.features[1:], start=1):
            h = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), name=f"enc{i}")(h))
            skips.append(h)
        h = nn.relu(nn.Conv(self.features[-1], (3, 3), name="bottleneck")(h))
        for i in range(len(self.features) - 2, -1, -1):
            skip = skips[i]
            h = _resize_to(h, skip.shape[1], skip.shape[2])
            h = nn.relu(nn.Conv(self.features[i], (3, 3), name=f"dec{i}")(h) + skip)
        return nn.Conv(self.out_channels, (3, 3), name="out")(h)


class StegaEncoder(nn.Module):
    """Hides a bit string in an image: ``(image, bits) -> residual`` bounded by ``eps``.

    The bits go through a dense layer to a coarse ``(h/2, w/2, 4)`` map, which is upsampled and
    concatenated with the image (as in StegaStamp) before a small conv encoder-decoder.

    Attributes:
        channels: image channels.
        eps: L-inf bound of the residual (``eps * tanh``), in [0, 1] pixel units.
        features: channels of the conv encoder-decoder.
    """

    channels: int
    eps: float
    features: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(
        self, images: Float[Array, "b h w c"], bits: Float[Array, "b n"]
    ) -> Float[Array, "b h w c"]:
        b, height, width, _ = images.shape
        coarse_h, coarse_w = -(-height // 2), -(-width // 2)
        secret = nn.Dense(coarse_h * coarse_w * 4, name="secret")(2.0 * bits - 1.0)
        secret = _resize_to(secret.reshape(b, coarse_h, coarse_w, 4), height, width)
        z = jnp.concatenate([images, secret], axis=-1)
        raw = ConvAutoencoder(self.channels, self.features, name="body")(z)
        return self.eps * jnp.tanh(raw)


class StegaDecoder(nn.Module):
    """Reads the bit logits back from an image (ISSBA's decoder; only needed while fitting).

    Attributes:
        num_bits: length of the hidden bit string.
        features: channels of the strided convs.
    """

    num_bits: int
    features: Sequence[int] = (16, 32, 32)

    @nn.compact
    def __call__(self, images: Float[Array, "b h w c"]) -> Float[Array, "b n"]:
        h = images - 0.5
        for i, width in enumerate(self.features):
            h = nn.relu(nn.Conv(width, (3, 3), strides=(1, 1) if i == 0 else (2, 2))(h))
        h = nn.relu(nn.Dense(64)(h.reshape(h.shape[0], -1)))
        return nn.Dense(self.num_bits)(h)
