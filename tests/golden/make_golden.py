"""Writes the golden files in `files/` (run once per file-format version, with the JAX backend).

    KERAS_BACKEND=jax python tests/golden/make_golden.py

Each model of `golden_models.BUILDERS` is trained two steps (so BatchNorm statistics, LoRA
adapters and weights differ from their initial values), then saved as `<name>.keras` and
`<name>.weights.h5`, with the inputs and the outputs `predict` gave in `<name>.npz`.
"""

import os
import pathlib
import sys

os.environ["KERAS_BACKEND"] = "jax"

import keras
import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

import golden_models  # noqa: E402


def inputs_for(name: str, model: keras.Model) -> np.ndarray:
    """Four deterministic examples of the model's input."""
    g = np.random.default_rng(7)
    shape = (4, *model.inputs[0].shape[1:])
    if name == "hf_bert":
        return g.integers(1, 50, size=shape).astype("int32")
    return g.normal(size=shape).astype("float32")


def main() -> None:
    out = HERE / "files"
    out.mkdir(exist_ok=True)
    for name, build in golden_models.BUILDERS.items():
        keras.utils.set_random_seed(0)
        model = build()
        x = inputs_for(name, model)
        target = np.random.default_rng(8).normal(size=model(x).shape).astype("float32")
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(x, target, epochs=2, batch_size=2, verbose=0)
        y = np.asarray(model.predict(x, verbose=0))
        model.save(out / f"{name}.keras")
        model.save_weights(out / f"{name}.weights.h5")
        np.savez(out / f"{name}.npz", x=x, y=y)
        print(f"{name}: outputs {y.shape}, {len(model.weights)} weights")


if __name__ == "__main__":
    main()
