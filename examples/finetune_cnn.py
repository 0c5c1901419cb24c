"""Fine-tune a pretrained Flax CNN with Keras callbacks.

Transfer learning with a Flax Linen CNN inside Keras, on scikit-learn's bundled 8x8 digits
(nothing is downloaded):

1. "Pretraining": the CNN learns digits 0-4. Its trained variables (`layer.flax_variables`,
   the format `module.init` returns) stand in for a pretrained checkpoint.
2. A new FlaxLayer gets those variables through `variables=`, with the backbone copied and a
   freshly initialized classifier head, for a new task: digits 5-9.
3. Head only: the backbone's Keras variables are frozen by their Flax path
   (`variable.trainable = False`), and the head trains with a step-decay
   `keras.callbacks.LearningRateScheduler`. The script checks that the backbone did not move.
4. Everything: unfrozen, at a lower learning rate with a `keras.optimizers.schedules.CosineDecay`
   schedule, `EarlyStopping(restore_best_weights=True)` and a `ModelCheckpoint` keeping the best
   `.keras` file.
5. The best checkpoint is loaded back with `keras.saving.load_model` and must predict what the
   model (holding the restored best weights) predicts.

Run: `.venv/bin/python examples/finetune_cnn.py [--small] [--out DIR]`, under any Keras backend
(`KERAS_BACKEND=jax|tensorflow|torch`, default jax). `--small` trains a few epochs (a smoke
test). The script exits non-zero if a check fails: the frozen
backbone moved, test accuracy on digits 5-9 is below 90% (full run) or at chance level
(`--small`: at most 40%, chance is 20%), or the reloaded checkpoint predicts differently.
"""

import argparse
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn
import jax
import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer

BACKBONE = ("conv1", "conv2", "hidden")


class CNN(nn.Module):
    """Two convolutions and a hidden Dense layer (the backbone), then a classifier head."""

    num_classes: int = 5
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(inputs))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64, name="hidden")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not training)(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


def load_task(digits, labels, classes):
    """Images and labels (renumbered 0..4) of `classes`, split 640 train / 224 test.

    The sizes are whole batches of 32 (also the 20% validation split of 640): a smaller last
    batch would be compiled once more.
    """
    keep = np.isin(labels, classes)
    x, y = digits[keep], (labels[keep] - classes[0]).astype("int32")
    return train_test_split(x, y, train_size=640, test_size=224, random_state=0, stratify=y)


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few epochs (smoke test)")
    parser.add_argument("--out", help="directory for the checkpoint (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.out:
        return run(args, args.out)
    with tempfile.TemporaryDirectory(prefix="finetune_cnn_") as out_dir:
        return run(args, out_dir)


def run(args, out_dir) -> int:
    pre_epochs, head_epochs, tune_epochs = (2, 1, 2) if args.small else (10, 5, 30)
    threshold = 0.40 if args.small else 0.90

    keras.utils.set_random_seed(0)
    data = load_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    # 1. Pretraining on digits 0-4.
    x_pre, _, y_pre, _ = load_task(images, data.target, [0, 1, 2, 3, 4])
    pretrained_layer = flaxlayer.FlaxLayer(CNN(), name="pretrained_cnn")
    pretrained = keras.Sequential([keras.Input((8, 8, 1)), pretrained_layer])
    compile_model(pretrained, 1e-3)
    pretrained.fit(x_pre, y_pre, batch_size=32, epochs=pre_epochs, verbose=0)
    checkpoint = pretrained_layer.flax_variables  # a pretrained checkpoint, as Flax has it

    # 2. A new model for digits 5-9: the pretrained backbone, a new head.
    x_train, x_test, y_train, y_test = load_task(images, data.target, [5, 6, 7, 8, 9])
    module = CNN()
    fresh = module.init(jax.random.PRNGKey(1), x_train[:1], training=False)
    params = {
        name: checkpoint["params"][name] if name in BACKBONE else fresh["params"][name]
        for name in fresh["params"]
    }
    layer = flaxlayer.FlaxLayer(module, variables={"params": params}, name="cnn")
    model = keras.Sequential([keras.Input((8, 8, 1)), layer])

    # 3. Head only: freeze the backbone's variables by their Flax path.
    layer.freeze(rf"params/({'|'.join(BACKBONE)})/.*")
    frozen = {v.path: to_numpy(v).copy() for v in layer.weights if not v.trainable}
    layer.describe()  # the backbone's rows now say trainable "no"
    compile_model(model, 3e-3)
    step_decay = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 3e-3 * 0.5**epoch)
    history = model.fit(
        x_train, y_train, batch_size=32, epochs=head_epochs, callbacks=[step_decay], verbose=0
    )
    moved = [
        p for p, value in frozen.items() if not np.array_equal(to_numpy(_var(layer, p)), value)
    ]
    if moved:
        raise SystemExit(f"FAIL: frozen backbone variables changed: {moved}")
    print(
        f"head only: training accuracy {100 * history.history['accuracy'][-1]:.1f}%, "
        "backbone unchanged"
    )

    # 4. Everything, at a lower, decaying learning rate, keeping the best epoch.
    layer.unfreeze(r"params/.*")
    steps = tune_epochs * (len(x_train) * 4 // 5) // 32
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps)
    compile_model(model, schedule)
    best_path = os.path.join(out_dir, "best.keras")
    history = model.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=tune_epochs,
        validation_split=0.2,
        callbacks=[
            keras.callbacks.EarlyStopping(patience=4, restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(best_path, save_best_only=True),
        ],
        verbose=0,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        f"fine-tuned {len(history.history['loss'])} epoch(s): test accuracy on digits 5-9 "
        f"{100 * accuracy:.1f}% (needs > {100 * threshold:.0f}%)"
    )
    if accuracy <= threshold:
        raise SystemExit(f"FAIL: accuracy {100 * accuracy:.1f}% <= {100 * threshold:.0f}%")

    # 5. The best checkpoint predicts what the model, holding the best weights, predicts.
    reloaded = keras.saving.load_model(best_path)
    diff = np.max(np.abs(reloaded.predict(x_test, verbose=0) - model.predict(x_test, verbose=0)))
    print(f"reloaded the best checkpoint: max abs prediction difference {diff:.1e}")
    if not diff <= 1e-5:
        raise SystemExit("FAIL: the reloaded checkpoint predicts differently")
    return 0


def _var(layer, path):
    return next(v for v in layer.weights if v.path == path)


if __name__ == "__main__":
    sys.exit(main())
