"""A Flax module that sows an auxiliary loss, trained with Keras.

Flax modules report extra loss terms by sowing them into the `"losses"` collection:
`self.sow("losses", name, value)`. `flaxlayer.FlaxLayer` adds the sum of everything sown there
to the model's loss (through Keras's `add_loss`), in `fit` and in `evaluate`. Other sown
collections (`"intermediates"`, ...) are dropped.

Here an MLP classifies scikit-learn's bundled 8x8 digits (nothing is downloaded) and sows an L1
activity penalty on its hidden layer, which pushes hidden units to zero. The script:

1. measures the penalty before and after training, in pure Flax
   (`module.apply(layer.flax_variables, x, mutable=["losses"])`): training lowers it;
2. checks that the loss Keras reports equals the cross-entropy of the predictions plus the sown
   penalty: the auxiliary loss really is part of the objective;
3. reports the test accuracy.

Run: `.venv/bin/python examples/sown_aux_loss.py [--small]`, under any Keras backend
(`KERAS_BACKEND=jax|tensorflow|torch`, default jax). `--small` trains 2 epochs. The script exits
non-zero if the penalty did not go down, if Keras's loss is not cross-entropy plus penalty, or
if the test accuracy is at most 90% (full run) or 50% (`--small`; chance is 10%).
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


class SparseMLP(nn.Module):
    """Dense -> relu -> Dense, with an L1 penalty on the hidden activations, sown as a loss."""

    hidden: int = 128
    l1: float = 0.03

    @nn.compact
    def __call__(self, inputs):
        h = nn.relu(nn.Dense(self.hidden)(inputs))
        self.sow("losses", "activity_l1", self.l1 * jnp.mean(jnp.sum(jnp.abs(h), axis=-1)))
        self.sow("intermediates", "hidden", h)  # dropped by the layer; only "losses" counts
        return nn.Dense(10)(h)


def sown_penalty(module, variables, x):
    """The sown penalty and the share of active hidden units, in pure Flax."""
    _, sown = module.apply(variables, x, mutable=["losses", "intermediates"])
    penalty = float(sum(jnp.sum(v) for v in jax.tree.leaves(sown["losses"])))
    active = float(np.mean(np.asarray(sown["intermediates"]["hidden"][0]) > 0))
    return penalty, active


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="train 2 epochs (smoke test)")
    args = parser.parse_args(argv)
    epochs, threshold = (2, 0.5) if args.small else (30, 0.9)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    # Sizes in whole batches of 32: a smaller last batch would be compiled once more.
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=1344, test_size=448, random_state=0, stratify=y
    )
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    module = SparseMLP()
    layer = flaxlayer.FlaxLayer(module, name="sparse_mlp")
    model = keras.Sequential([keras.Input((64,)), layer])
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    before, active_before = sown_penalty(module, layer.flax_variables, x_test)
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    after, active_after = sown_penalty(module, layer.flax_variables, x_test)
    print(
        f"sown L1 penalty {before:.4f} -> {after:.4f}; "
        f"active hidden units {100 * active_before:.0f}% -> {100 * active_after:.0f}%"
    )
    if not after < before:
        raise SystemExit("FAIL: training did not lower the sown penalty")

    # Keras's loss = cross-entropy of the predictions + the sown penalty.
    keras_loss, accuracy = model.evaluate(x_test, y_test, batch_size=32, verbose=0)
    logits = model.predict(x_test, batch_size=32, verbose=0)
    cross_entropy = float(
        np.mean(
            keras.ops.convert_to_numpy(
                keras.losses.sparse_categorical_crossentropy(y_test, logits, from_logits=True)
            )
        )
    )
    print(
        f"evaluate: loss {keras_loss:.5f} = cross-entropy {cross_entropy:.5f} "
        f"+ sown penalty {after:.5f} ({cross_entropy + after:.5f})"
    )
    if not abs(keras_loss - (cross_entropy + after)) < 1e-4:
        raise SystemExit("FAIL: Keras's loss is not cross-entropy plus the sown penalty")

    print(f"test accuracy: {100 * accuracy:.1f}% (needs > {100 * threshold:.0f}%)")
    if accuracy <= threshold:
        raise SystemExit(f"FAIL: test accuracy {100 * accuracy:.1f}% <= {100 * threshold:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
