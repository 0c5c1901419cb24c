"""FlaxLayer and ordinary Keras layers in one Functional model.

A `keras.Input` goes through Keras's own `Conv2D`, `MaxPooling2D` and `Flatten`, then through a
Flax Linen block (Dense, BatchNorm, relu, Dropout) wrapped in `flaxlayer.FlaxLayer`, then through
a Keras `Dense` classifier. Keras passes `training` through the whole graph: the Flax block's
BatchNorm updates its statistics and its Dropout is active in `fit` only. The script:

1. trains the model on scikit-learn's bundled 8x8 digits (nothing is downloaded) and prints
   `model.summary()`, where the Flax block is one row, and `layer.describe()`, its inside;
2. checks that training updated the Flax BatchNorm statistics (non-trainable Keras variables);
3. saves the model as `.keras`, loads it back with `keras.saving.load_model`, and checks that
   the reloaded model predicts what the trained one predicts.

Run: `.venv/bin/python examples/mixed_functional.py [--small] [--out DIR]`, under any Keras
backend (`KERAS_BACKEND=jax|tensorflow|torch`, default jax). `--small` trains 2 epochs. The
script exits non-zero if the test accuracy is at most 95% (full run) or 50% (`--small`; chance
is 10%), if BatchNorm's statistics did not move, or if the reloaded model predicts differently.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer


class FlaxBlock(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout."""

    features: int = 64
    dropout_rate: float = 0.3

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(self.features)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dropout(self.dropout_rate, deterministic=not training)(x)


def build_model():
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = flaxlayer.FlaxLayer(FlaxBlock(), name="flax_block")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="mixed")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="train 2 epochs (smoke test)")
    parser.add_argument("--out", help="directory for the .keras file (default: a temporary one)")
    args = parser.parse_args(argv)
    epochs, threshold = (2, 0.5) if args.small else (20, 0.95)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int32")
    # Sizes in whole batches of 32: a smaller last batch would be compiled once more.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, train_size=1344, test_size=448, random_state=0, stratify=labels
    )
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.summary()
    flax_block = model.get_layer("flax_block")
    flax_block.describe()

    stats = flax_block.state["batch_stats"]["BatchNorm_0"]
    mean_before = to_numpy(stats["mean"]).copy()
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    moved = float(np.max(np.abs(to_numpy(stats["mean"]) - mean_before)))
    print(
        f"test accuracy: {100 * accuracy:.1f}% (needs > {100 * threshold:.0f}%); "
        f"BatchNorm running mean moved by up to {moved:.3f}"
    )
    if accuracy <= threshold:
        raise SystemExit(f"FAIL: test accuracy {100 * accuracy:.1f}% <= {100 * threshold:.0f}%")
    if not moved > 0:
        raise SystemExit("FAIL: training did not update the Flax BatchNorm statistics")

    with tempfile.TemporaryDirectory(prefix="mixed_functional_") as tmp:
        path = os.path.join(args.out or tmp, "mixed.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    expected = model.predict(x_test, verbose=0)
    diff = float(np.max(np.abs(reloaded.predict(x_test, verbose=0) - expected)))
    print(f"saved and reloaded mixed.keras: max abs prediction difference {diff:.1e}")
    if not diff <= 1e-6:
        raise SystemExit("FAIL: the reloaded model predicts differently")
    return 0


if __name__ == "__main__":
    sys.exit(main())
