"""A Flax NNX transformer block, trained with Keras on the PyTorch backend.

The model is a plain `flax.nnx` module: token and position embeddings, one pre-norm transformer
block (`nnx.MultiHeadAttention` and an MLP, each behind an `nnx.LayerNorm`, with `nnx.Dropout`),
then mean pooling and a classifier. `flaxlayer.FlaxLayer` makes it a Keras layer, and Keras's
`fit` trains it on the PyTorch backend: tensors cross between torch and JAX by DLPack, and the
backward pass runs JAX's `vjp` inside a `torch.autograd.Function`.

The task is generated here: sequences of 12 tokens from a vocabulary of 8; the label says
whether token 1 occurs more often than token 2 (ties are left out, so chance is 50%).

The module's `__call__` takes no `training` argument, so the layer runs it in train mode
(dropout on) in `fit` and in eval mode in `predict`: two predictions agree exactly. Then
`layer.module`, an NNX module holding the trained values, must give what `model.predict` gives.

Run: `.venv/bin/python examples/nnx_transformer_torch.py [--small]`. This script always uses the
torch backend (it sets `KERAS_BACKEND=torch` itself). `--small` trains 2 epochs on fewer
sequences. It exits non-zero if the test accuracy is at most 95% (full run) or 65% (`--small`),
or if predictions are not deterministic or the trained NNX module disagrees.
"""

import argparse
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import jax
import keras
import numpy as np
from flax import nnx

import flaxlayer

VOCAB, LENGTH = 8, 12


class TransformerClassifier(nnx.Module):
    """Embeddings, one pre-norm transformer block, mean pooling, a linear classifier."""

    def __init__(self, vocab, length, dim, heads, classes, dropout, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (length, dim)))
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.classifier = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, inputs):
        x = self.embed(inputs) + self.position[...]
        x = x + self.dropout(self.attention(self.norm1(x)))
        x = x + self.dropout(self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x)))))
        return self.classifier(x.mean(axis=1))


def make_data(n, seed):
    """Token sequences, and whether token 1 is more frequent than token 2 (no ties)."""
    g = np.random.default_rng(seed)
    x = g.integers(0, VOCAB, size=(2 * n, LENGTH)).astype("int32")
    ones, twos = (x == 1).sum(axis=1), (x == 2).sum(axis=1)
    keep = ones != twos
    return x[keep][:n], (ones > twos)[keep][:n].astype("int32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 epochs, fewer sequences")
    args = parser.parse_args(argv)
    n_train, epochs, threshold = (1536, 2, 0.65) if args.small else (6144, 10, 0.95)

    keras.utils.set_random_seed(0)
    x_train, y_train = make_data(n_train, seed=0)
    x_test, y_test = make_data(1024, seed=1)
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    module = TransformerClassifier(
        VOCAB, LENGTH, dim=32, heads=4, classes=2, dropout=0.1, rngs=nnx.Rngs(0)
    )
    layer = flaxlayer.FlaxLayer(module, name="transformer")
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), layer])
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"{model.count_params():,} parameters in {len(layer.weights)} variables")
    history = model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    losses = history.history["loss"]
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} in {epochs} epochs")

    _, accuracy = model.evaluate(x_test, y_test, batch_size=64, verbose=0)
    print(f"test accuracy: {100 * accuracy:.1f}% (needs > {100 * threshold:.0f}%)")
    if accuracy <= threshold:
        raise SystemExit(f"FAIL: test accuracy {100 * accuracy:.1f}% <= {100 * threshold:.0f}%")

    # Inference is in eval mode: dropout is off, so predictions repeat exactly.
    first, second = (
        model.predict(x_test, batch_size=64, verbose=0),
        model.predict(x_test, batch_size=64, verbose=0),
    )
    if not np.array_equal(first, second):
        raise SystemExit("FAIL: two predictions differ: dropout is on at inference")

    # Back to Flax: `layer.module` is the module holding the trained values.
    trained = layer.module
    trained.eval()
    flax_out = np.asarray(trained(x_test))
    diff = float(np.max(np.abs(flax_out - first)))
    print(f"predictions repeat exactly; the trained NNX module agrees (max abs diff {diff:.1e})")
    if not diff <= 1e-5:
        raise SystemExit("FAIL: the trained NNX module disagrees with model.predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
