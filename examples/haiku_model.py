"""A Haiku model as a Keras layer, through `flaxlayer.JaxLayer`.

`hk.transform_with_state(f)` gives an `(init, apply)` pair of pure functions. `JaxLayer` takes
them as they are: `JaxLayer(transformed.apply, transformed.init)`. Haiku's params become
trainable Keras variables (`haiku_mlp/params/hidden_0/w`, ...), its state (BatchNorm's
moving averages) non-trainable ones, updated after each training step; `hk.next_rng_key()` gets a
fresh key on every call. This script:

1. trains a Haiku MLP with BatchNorm and dropout with Keras's `fit` on scikit-learn's bundled
   8x8 digits (nothing is downloaded), and prints its variable table (`layer.describe()`);
2. reports the test accuracy;
3. hands the trained params and state back to Haiku and checks that
   `transformed.apply(params, state, None, x, training=False)` equals `model.predict(x)`.

Run: `.venv/bin/python examples/haiku_model.py [--small]`, under any Keras backend
(`KERAS_BACKEND=jax|tensorflow|torch`, default jax). `--small` trains 2 epochs (a smoke test).
The script exits non-zero if the test accuracy is at most 90% (full run) or 50% (`--small`;
chance is 10%), or if Haiku's own apply disagrees with the Keras model.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import haiku as hk
import jax
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer


def forward(inputs, training):
    """An MLP with BatchNorm and dropout, in Haiku."""
    x = jax.nn.relu(hk.Linear(64, name="hidden_0")(inputs))
    x = hk.Linear(64, name="hidden_1")(x)
    x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, training)
    x = jax.nn.relu(x)
    if training:
        x = hk.dropout(hk.next_rng_key(), 0.2, x)
    return hk.Linear(10, name="classifier")(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="train 2 epochs (smoke test)")
    args = parser.parse_args(argv)
    epochs, threshold = (2, 0.5) if args.small else (30, 0.9)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # (N, 64)
    y = digits.target.astype("int32")
    # Sizes in whole batches of 32: a smaller last batch would be compiled once more.
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=1344, test_size=448, random_state=0, stratify=y
    )
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    transformed = hk.transform_with_state(forward)
    layer = flaxlayer.JaxLayer(transformed.apply, transformed.init, name="haiku_mlp")
    model = keras.Sequential([keras.Input((64,)), layer])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    layer.describe()
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {100 * accuracy:.1f}% (needs > {100 * threshold:.0f}%)")
    if accuracy <= threshold:
        raise SystemExit(f"FAIL: test accuracy {100 * accuracy:.1f}% <= {100 * threshold:.0f}%")

    # Back to Haiku: the layer's params and state are pytrees of Keras variables.
    def to_numpy(variable):
        return np.asarray(keras.ops.convert_to_numpy(variable))

    params = jax.tree.map(to_numpy, layer.params)
    state = jax.tree.map(to_numpy, layer.state)
    haiku_out, _ = transformed.apply(params, state, None, x_test, training=False)
    diff = float(np.max(np.abs(np.asarray(haiku_out) - model.predict(x_test, verbose=0))))
    print(f"Haiku's transformed.apply agrees with model.predict (max abs diff {diff:.1e})")
    if not diff <= 1e-5:
        raise SystemExit("FAIL: Haiku's apply with the trained variables disagrees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
