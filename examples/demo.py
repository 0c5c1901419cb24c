"""Train a Flax module as a Keras layer, then take its weights back to pure Flax.

This demo shows the whole round trip `flaxlayer` is for:

1. The first example module of `keras.layers.FlaxLayer`'s documentation (a small CNN written in
   `flax.linen`) is wrapped in `flaxlayer.FlaxLayer` and used as a layer of a Keras model.
2. The model is compiled and trained with Keras's own `fit` (progress bar included) on
   scikit-learn's bundled 8x8 digits, which ship with scikit-learn: nothing is downloaded.
3. The test accuracy is printed as `test accuracy: NN.N%` (the full run must reach 95%).
4. `layer.flax_variables` are handed to the plain module, `module.apply(variables, x)`, and
   its outputs are checked against `model.predict`: train in Keras, deploy in pure Flax.

Run it with `make demo`, or `python examples/demo.py [--small]`. `--small` trains for one
epoch and skips the accuracy threshold (a quick smoke test); the agreement check still runs.
The script exits non-zero if the accuracy is below 95% (full run) or the outputs disagree.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer

ACCURACY_THRESHOLD = 0.95
FULL_EPOCHS = 20
SMALL_EPOCHS = 1


class MyFlaxModule(nn.Module):
    """The first example module of `keras.layers.FlaxLayer`'s documentation, unchanged."""

    @nn.compact
    def __call__(self, inputs):
        x = inputs
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=200)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        x = nn.softmax(x)
        return x


def load_data():
    """scikit-learn's bundled digits as (N, 8, 8, 1) float32 images in [0, 1]; no download."""
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int32")
    return train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"train {SMALL_EPOCHS} epoch(s) and skip the accuracy threshold (smoke test)",
    )
    args = parser.parse_args(argv)
    epochs = SMALL_EPOCHS if args.small else FULL_EPOCHS

    keras.utils.set_random_seed(0)
    x_train, x_test, y_train, y_test = load_data()
    print(
        f"Keras {keras.__version__} (backend {keras.backend.backend()}), flaxlayer "
        f"{flaxlayer.__version__}; digits: {len(x_train)} train / {len(x_test)} test images"
    )

    module = MyFlaxModule()
    layer = flaxlayer.FlaxLayer(module)
    model = keras.Sequential([keras.Input(shape=(8, 8, 1)), layer])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()

    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=epochs,
        validation_split=0.1,
        verbose=1,
    )
    train_seconds = time.perf_counter() - start
    print(f"trained {epochs} epoch(s) in {train_seconds:.1f} s")

    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {100 * accuracy:.1f}%")

    # Back to pure Flax: the trained variables in the format `module.init` returns.
    keras_out = model.predict(x_test, verbose=0)
    flax_out = np.asarray(module.apply(layer.flax_variables, x_test))
    try:
        np.testing.assert_allclose(flax_out, keras_out, atol=1e-5, rtol=0)
    except AssertionError as e:
        print(f"FAIL: module.apply(layer.flax_variables, x) disagrees with model.predict:\n{e}")
        return 1
    max_diff = float(np.max(np.abs(flax_out - keras_out)))
    print(
        "pure Flax module.apply(layer.flax_variables, x_test) agrees with model.predict "
        f"(max abs diff {max_diff:.1e}, atol 1e-5)"
    )

    if not args.small and accuracy < ACCURACY_THRESHOLD:
        print(f"FAIL: test accuracy {100 * accuracy:.1f}% < {100 * ACCURACY_THRESHOLD:g}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
