"""A variational autoencoder whose sampling draws from an rng stream, at inference too.

The VAE is a Flax Linen module. Its reparameterisation draws the latent noise with
`self.make_rng("sample")`, a stream of its own (not `"dropout"`), and it sows its KL divergence
into the `"losses"` collection. `flaxlayer.FlaxLayer` finds the stream by itself and gives it a
fresh key on every call, in `fit` and in `predict` alike, and adds the sown KL term to the
model's loss. This script:

1. trains the VAE on scikit-learn's bundled 8x8 digits (nothing is downloaded), with binary
   cross-entropy reconstruction loss plus the sown KL term;
2. predicts the same images twice: the reconstructions differ, since each call samples new
   latents;
3. builds a second layer on the module's `generate` method (`method="generate"`) from the trained
   decoder's variables (`variables=`), and samples new digits from the prior: two calls give two
   different batches.

Run: `.venv/bin/python examples/vae_sampling.py [--small]`, under any Keras backend
(`KERAS_BACKEND=jax|tensorflow|torch`, default jax). `--small` trains 2 epochs. The script exits
non-zero if the training loss did not go down, if two predictions are equal, or if two generated
batches are equal or not in [0, 1]. The full run also checks that reconstructions beat the mean
image (lower squared error).
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer

PIXELS = 64


class Encoder(nn.Module):
    latent: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.latent, name="mean")(h), nn.Dense(self.latent, name="log_var")(h)


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.relu(nn.Dense(128)(z))
        return nn.sigmoid(nn.Dense(PIXELS)(h))


class VAE(nn.Module):
    latent: int = 8

    def setup(self):
        self.encoder = Encoder(self.latent)
        self.decoder = Decoder()

    def __call__(self, inputs):
        """A reconstruction of `inputs`, through a latent sampled from the "sample" stream."""
        mean, log_var = self.encoder(inputs)
        noise = jax.random.normal(self.make_rng("sample"), mean.shape)
        z = mean + jnp.exp(0.5 * log_var) * noise
        kl = -0.5 * jnp.sum(1.0 + log_var - mean**2 - jnp.exp(log_var), axis=-1)
        # Keras's binary cross-entropy is a mean over pixels: scale the KL term to match.
        self.sow("losses", "kl", jnp.mean(kl) / PIXELS)
        return self.decoder(z)

    def generate(self, inputs):
        """New images from latents sampled around `inputs` (zeros: from the prior)."""
        z = inputs + jax.random.normal(self.make_rng("sample"), inputs.shape)
        return self.decoder(z)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="train 2 epochs (smoke test)")
    args = parser.parse_args(argv)
    epochs = 2 if args.small else 40

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    # Sizes in whole batches of 64: a smaller last batch would be compiled once more.
    x_train, x_test = train_test_split(x, train_size=1280, test_size=512, random_state=0)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    vae = VAE()
    layer = flaxlayer.FlaxLayer(vae, name="vae")
    model = keras.Sequential([keras.Input((PIXELS,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy")
    history = model.fit(x_train, x_train, batch_size=64, epochs=epochs, verbose=0)
    losses = history.history["loss"]
    print(f"loss (reconstruction + sown KL): {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        raise SystemExit("FAIL: the training loss did not go down")

    # The "sample" stream gets fresh keys at inference too: each prediction samples anew.
    first = model.predict(x_test, batch_size=64, verbose=0)
    second = model.predict(x_test, batch_size=64, verbose=0)
    spread = float(np.mean(np.abs(first - second)))
    error = float(np.mean((first - x_test) ** 2))
    baseline = float(np.mean((x_train.mean(axis=0) - x_test) ** 2))
    print(
        f"two predictions of the same images differ by {spread:.4f} on average; "
        f"reconstruction MSE {error:.4f} (mean image: {baseline:.4f})"
    )
    if not spread > 1e-4:
        raise SystemExit("FAIL: two predictions are equal: no fresh sample at inference")
    if not args.small and not error < baseline:
        raise SystemExit("FAIL: reconstructions are no better than the mean image")

    # A generator: the `generate` method, with the trained decoder's variables only.
    trained = layer.flax_variables
    generator = flaxlayer.FlaxLayer(
        VAE(), method="generate", variables={"params": {"decoder": trained["params"]["decoder"]}}
    )
    prior = np.zeros((16, vae.latent), "float32")
    a, b = to_numpy(generator(prior)), to_numpy(generator(prior))
    print(
        f"generated {a.shape[0]} digits twice: batches differ by {np.mean(np.abs(a - b)):.4f} "
        f"on average, pixel range [{a.min():.2f}, {a.max():.2f}]"
    )
    if np.array_equal(a, b) or a.min() < 0 or a.max() > 1:
        raise SystemExit("FAIL: generated batches are equal or leave [0, 1]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
