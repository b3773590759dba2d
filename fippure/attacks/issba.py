"""ISSBA / SSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV
2021): a steganography encoder hides a fixed secret code in every poisoned image.

ISSBA takes a StegaStamp encoder-decoder (Tancik et al., 2020), trained beforehand to hide
random bit strings in images and read them back, and poisons with ``x + E(x, s)`` for one
secret string s (paper section 3.2, eq. 2): the residual differs from image to image, but a
network that reads the code learns to spot it.

Here the pair is small and trained in :meth:`ISSBA.fit` on the attacker's training images (the
paper uses a pretrained StegaStamp): per step a batch of images gets random bit strings b,
the encoder's residual r = eps * tanh(.) (so ||r||_inf <= eps) and the decoder's logits of
clip(x + r) + n, with Gaussian noise n of std ``fit_noise``, minimising

    BCE(D(clip(x + r) + n), b) + image_weight * mean(r^2)

(StegaStamp's bit and L2 image losses, without its perceptual and adversarial terms
**(choice: no LPIPS network or critic to train on CPU)**). StegaStamp puts image corruptions
between encoder and decoder so that the code survives them; here the noise n plays that role.
Without it the encoder settles on the faintest residual the decoder can read (RMS about 3/255 at
eps 0.05), and a CIFAR-10 classifier trained on 10% poison did not pick it up (ASR 0.06 after 5
epochs); the noise makes the residual strong enough to be a trigger. The secret s is drawn from the
attack's key. Only the encoder's parameters and s are saved with the checkpoint; the decoder
is needed only to fit and to check the code is readable (:meth:`ISSBA.decode`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from fippure.attacks.base import Attack, AttackContext, Images, State
from fippure.attacks.fit_checkpoints import open_progress
from fippure.config_checks import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, UNIT_POSITIVE
from fippure.data.pipeline import to_unit_range
from fippure.errors import InvalidInputError
from fippure.models.generators import StegaDecoder, StegaEncoder
from fippure.step_inputs import device_indices, step_guard


@dataclasses.dataclass(frozen=True)
class ISSBA(Attack):
    """ISSBA with a small encoder trained here; see the module docstring.

    Attributes:
        num_bits: length of the secret code.
        eps: L-inf bound of the residual in [0, 1] pixel units.
        fit_noise: std of the Gaussian noise added to encoded images before the decoder
            during the fit (StegaStamp's corruption layer); 0 disables it.
        image_weight: weight of the residual's mean square in the fitting loss.
        fit_steps: Adam steps of the encoder-decoder fit.
        fit_batch_size: images per fitting step.
        fit_lr: Adam learning rate of the fit.
        ramp_fraction: fraction of the fit over which the image loss's weight rises
            linearly from 0 to ``image_weight`` (StegaStamp ramps its image losses so the
            encoder first learns to hide the code).
        encoder_width: channels of the encoder's first level (then 2x).
    """

    name: ClassVar[str] = "issba"
    fit_checkpoint_every: ClassVar[int] = 500
    num_bits: int = 32
    eps: float = 0.1
    fit_noise: float = 0.05
    image_weight: float = 10.0
    fit_steps: int = 1500
    fit_batch_size: int = 64
    fit_lr: float = 2e-3
    ramp_fraction: float = 0.5
    encoder_width: int = 16
    rules: ClassVar = {
        "num_bits": AT_LEAST_ONE,
        "eps": UNIT_POSITIVE,
        "fit_noise": NON_NEGATIVE,
        "image_weight": NON_NEGATIVE,
        "fit_steps": NON_NEGATIVE,
        "fit_batch_size": AT_LEAST_ONE,
        "fit_lr": POSITIVE,
        "ramp_fraction": FRACTION,
        "encoder_width": AT_LEAST_ONE,
    }

    def _encoder(self, channels: int) -> StegaEncoder:
        w = self.encoder_width
        return StegaEncoder(channels, self.eps, (w, 2 * w))

    def init_state(self, key, spec) -> State:
        code_key, encoder_key, decoder_key = jax.random.split(key, 3)
        images = jnp.zeros((1, *spec.image_shape), jnp.float32)
        bits = jnp.zeros((1, self.num_bits), jnp.float32)
        encoder = self._encoder(spec.image_shape[-1])
        return {
            "code": jax.random.bernoulli(code_key, jnp.float32(0.5), (self.num_bits,)).astype(
                jnp.float32
            ),
            "encoder": encoder.init(encoder_key, images, bits)["params"],
            "decoder": StegaDecoder(self.num_bits).init(decoder_key, images)["params"],
        }

    def residual(self, state: State, images: Images, bits: Float[Array, "b n"] | None = None):
        """The encoder's residual hiding ``bits`` (default: the secret code) in ``images``."""
        if bits is None:
            bits = jnp.broadcast_to(state["code"], (images.shape[0], self.num_bits))
        encoder = self._encoder(images.shape[-1])
        return encoder.apply({"params": state["encoder"]}, images, bits)

    def _trigger(self, state: State, images: Images, key=None) -> Images:
        del key
        return jnp.clip(images + self.residual(state, images), 0.0, 1.0)

    def decode(self, state: State, images: Images) -> Float[Array, "b n"]:
        """Bit probabilities read by the decoder (needs the fitted, unsaved state)."""
        logits = StegaDecoder(self.num_bits).apply({"params": state["decoder"]}, images)
        return jax.nn.sigmoid(logits)

    def saved_state(self, state: State) -> State:
        return {"code": state["code"], "encoder": state["encoder"]}

    def fit(
        self,
        state: State,
        context: AttackContext,
        *,
        workdir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        stop_after_steps: int | None = None,
    ) -> State:
        """Trains the encoder-decoder on the attacker's training images (jitted, Adam).

        Args:
            state: from :meth:`init_state`.
            context: the attacker's training set, key and progress flag.
            workdir: saves the parameters and Adam state there every ``checkpoint_every``
                steps and at the end, and resumes from a save of the same fit
                (:mod:`fippure.attacks.fit_checkpoints`); step ``i`` draws its batch from
                ``fold_in(key, i)``, so a resumed fit ends as an uninterrupted one. ``None``:
                nothing is written.
            checkpoint_every: save interval in steps (default :attr:`fit_checkpoint_every`,
                500).
            stop_after_steps: stop (after saving) once this many steps are done, returning
                the partial fit; for tests and for splitting a long fit.

        Raises:
            CheckpointError: ``workdir`` holds the progress of another fit.
        """
        store = open_progress(self, state, context, workdir, checkpoint_every)
        images = jax.device_put(context.train.images)
        n = len(context.train)
        batch_size = min(self.fit_batch_size, n)
        optimizer = optax.adam(self.fit_lr)
        params = {"encoder": state["encoder"], "decoder": state["decoder"]}

        def loss_fn(params, x, bits, noise, image_weight):
            encoded = jnp.clip(x + self.residual(params, x, bits), 0.0, 1.0)
            logits = StegaDecoder(self.num_bits).apply(
                {"params": params["decoder"]}, encoded + self.fit_noise * noise
            )
            bit_loss = optax.sigmoid_binary_cross_entropy(logits, bits).mean()
            image_loss = jnp.mean((encoded - x) ** 2)
            accuracy = jnp.mean((logits > 0) == (bits > 0.5))
            return bit_loss + image_weight * image_loss, (bit_loss, accuracy)

        # The training set is an argument, not a closed-over constant that XLA would bake
        # into the compiled program; step i's key is fold_in(key, i).
        @jax.jit
        def step(params, opt_state, key, i, images):
            rows_key, bits_key, noise_key = jax.random.split(jax.random.fold_in(key, i), 3)
            # StegaStamp's ramp: the image loss fades in once the code is readable.
            ramp = jnp.clip(
                i.astype(jnp.float32) / (self.ramp_fraction * self.fit_steps + 1.0), 0.0, 1.0
            )
            rows = jax.random.randint(rows_key, (batch_size,), 0, n, jnp.int32)
            x = to_unit_range(images[rows])
            bits = jax.random.bernoulli(bits_key, jnp.float32(0.5), (batch_size, self.num_bits))
            noise = jax.random.normal(noise_key, x.shape, x.dtype)
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (bit_loss, accuracy)), grads = grad_fn(
                params, x, bits.astype(jnp.float32), noise, ramp * self.image_weight
            )
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, accuracy

        opt_state = optimizer.init(params)
        start = 0
        if store is not None:
            start, (params, opt_state) = store.restore((params, opt_state))
        stop = self.fit_steps if stop_after_steps is None else min(self.fit_steps, stop_after_steps)
        key = jax.random.fold_in(context.key, 0x155BA)
        bar = tqdm(
            total=self.fit_steps,
            initial=start,
            disable=not context.progress,
            desc=f"issba encoder {context.spec.name}",
            unit="step",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        try:
            for i, index in zip(range(start, stop), device_indices(start, stop), strict=True):
                with step_guard():
                    params, opt_state, loss, accuracy = step(params, opt_state, key, index, images)
                bar.update(1)
                done = i + 1
                saving = store is not None and store.due(done, stop)
                if done % 100 == 0 or done == self.fit_steps or saving:
                    loss = float(loss)
                    if not np.isfinite(loss):
                        raise InvalidInputError(f"issba fit diverged (loss {loss}); lower fit_lr")
                    bar.set_postfix(loss=f"{loss:.3f}", bit_accuracy=f"{float(accuracy):.3f}")
                if saving:
                    store.save(done, (params, opt_state), "the issba fit")
        finally:
            bar.close()
            if store is not None:
                store.close()
        return {**state, **params}
