"""Fine-tune a pretrained Flax transformer with LoRA, then ship it as int8: no change to its code.

1. Pretraining: a small Linen transformer (each 8x8 digit is a sequence of 8 rows) is trained on
   digits 0-4, and its variables are saved as a Flax checkpoint (`flax.serialization`).
2. The checkpoint is restored, as you would restore your own, into a new `FlaxLayer` for a new
   task: digits 5-9.
3. LoRA: every parameter is frozen except the classifier head, and low-rank adapters are added
   to the attention kernels by their Flax paths (`layer.enable_lora(4, paths=...)`). Only the
   adapters and the head train, and the optimizer holds state for them alone.
4. The adapters are merged into the kernels (`layer.merge_lora()`), and `model.quantize("int8")`
   stores every kernel as int8 with a float scale per output channel; the `.keras` file reloads.

Each stage prints the test accuracy, the trainable parameter count and the weights file size.
Run `python examples/lora_finetune.py [--small]`; `--small` trains for a few epochs and checks
only that the stages run and agree. The script exits non-zero if a check fails.
"""

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")

import flax.linen as nn
import jax
import keras
import numpy as np
from flax import serialization
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import flaxlayer

ATTENTION_KERNELS = r"params/block_\d/attention/(query|key|value|out)/kernel"


class Block(nn.Module):
    """Pre-norm self-attention and MLP, as in Flax's lm1b and ViT examples."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(self.heads, name="attention")(y, y)
        x = x + y
        y = nn.Dense(2 * self.width, name="mlp_in")(nn.LayerNorm()(x))
        y = nn.Dropout(0.1, deterministic=not train)(nn.gelu(y))
        return x + nn.Dense(self.width, name="mlp_out")(y)


class DigitTransformer(nn.Module):
    """Rows of an 8x8 digit as 8 tokens, two blocks, mean-pooled into a classifier."""

    classes: int = 5
    width: int = 32
    heads: int = 4
    depth: int = 2

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.Dense(self.width, name="embed")(images.reshape(images.shape[0], 8, 8))
        x = x + self.param("position", nn.initializers.normal(0.02), (8, self.width))
        for i in range(self.depth):
            x = Block(self.width, self.heads, name=f"block_{i}")(x, train)
        return nn.Dense(self.classes, name="classifier")(nn.LayerNorm()(x).mean(axis=1))


def load_task(images, labels, classes):
    keep = np.isin(labels, classes)
    x, y = images[keep], (labels[keep] - classes[0]).astype("int32")
    return train_test_split(x, y, train_size=640, test_size=224, random_state=0, stratify=y)


def compiled(layer, learning_rate):
    model = keras.Sequential([keras.Input((8, 8, 1)), layer])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def report(stage, model, x_test, y_test, out_dir):
    """Prints and returns (accuracy, trainable parameters, weights file bytes)."""
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    path = os.path.join(out_dir, f"{stage.split()[0]}.weights.h5")
    keras.Model(model.inputs, model.outputs).save_weights(path)  # the model's, no optimizer
    size = os.path.getsize(path)
    print(
        f"{stage:<18} test accuracy {100 * accuracy:5.1f}%  trainable {trainable:>6,}  "
        f"weights file {size / 1024:5.1f} KiB"
    )
    return accuracy, trainable, size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a few epochs (smoke test)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lora_finetune_") as out_dir:
        return run(args.small, out_dir)


def run(small: bool, out_dir: str) -> int:
    pre_epochs, lora_epochs = (2, 2) if small else (30, 30)
    keras.utils.set_random_seed(0)
    data = load_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")

    # 1. Pretraining on digits 0-4, saved as a Flax checkpoint.
    x_pre, _, y_pre, _ = load_task(images, data.target, [0, 1, 2, 3, 4])
    pretraining = flaxlayer.FlaxLayer(DigitTransformer(), name="pretraining")
    compiled(pretraining, 3e-3).fit(x_pre, y_pre, batch_size=32, epochs=pre_epochs, verbose=0)
    checkpoint = os.path.join(out_dir, "pretrained.msgpack")
    with open(checkpoint, "wb") as f:
        f.write(serialization.to_bytes(pretraining.flax_variables))

    # 2. The checkpoint restored into a layer for digits 5-9.
    module = DigitTransformer()
    x_train, x_test, y_train, y_test = load_task(images, data.target, [5, 6, 7, 8, 9])
    template = module.init(jax.random.PRNGKey(0), x_train[:1])
    with open(checkpoint, "rb") as f:
        restored = serialization.from_bytes(template, f.read())
    layer = flaxlayer.FlaxLayer(module, variables=restored, name="transformer")
    model = compiled(layer, 3e-3)
    full = report("pretrained", model, x_test, y_test, out_dir)

    # 3. LoRA on the attention kernels; the classifier head trains too, nothing else does.
    layer.freeze(r"params/.*")
    layer.unfreeze(r"params/classifier/.*")
    layer.enable_lora(4, paths=ATTENTION_KERNELS)
    model = compiled(layer, 3e-3)  # compile again after changing what trains, as in Keras
    model.fit(x_train, y_train, batch_size=32, epochs=lora_epochs, verbose=0)
    slots = [v.path for v in model.optimizer.variables if v.path.endswith("_momentum")]
    lora = report("LoRA fine-tuned", model, x_test, y_test, out_dir)

    # 4. Adapters merged into the kernels, then int8 kernels.
    layer.merge_lora()
    merged_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    with warnings.catch_warnings():  # Keras notes that its InputLayer has nothing to quantize
        warnings.simplefilter("ignore")
        model.quantize("int8")
    int8 = report("merged, int8", model, x_test, y_test, out_dir)
    path = os.path.join(out_dir, "int8.keras")
    with warnings.catch_warnings():  # the model's classes are in __main__: fine in-process
        warnings.simplefilter("ignore")
        model.save(path)
        reloaded = keras.saving.load_model(path)
    same = np.array_equal(reloaded.predict(x_test, verbose=0), model.predict(x_test, verbose=0))

    print(
        f"LoRA trained {lora[1]:,} of {full[1]:,} parameters "
        f"({100 * lora[1] / full[1]:.1f}%), and Adam kept state for those alone; int8 "
        f"changed accuracy by {100 * (int8[0] - merged_accuracy):+.1f} points and made the "
        f"weights {full[2] / int8[2]:.1f}x smaller; int8.keras reloads "
        + ("with equal predictions" if same else "DIFFERENTLY")
    )
    if not same:
        raise SystemExit("FAIL: the reloaded int8 model predicts differently")
    if [p for p in slots if "lora" not in p and "classifier" not in p]:
        raise SystemExit(f"FAIL: the optimizer holds state for frozen variables: {slots}")
    if abs(int8[0] - merged_accuracy) > 0.03:
        raise SystemExit("FAIL: int8 moved the accuracy by more than 3 points")
    if not small and lora[0] < 0.90:
        raise SystemExit(f"FAIL: LoRA accuracy {100 * lora[0]:.1f}% < 90%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
