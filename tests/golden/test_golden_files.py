"""The file format's compatibility test: files written by an earlier flaxlayer still load.

`files/` holds `.keras` and `.weights.h5` files written by flaxlayer's main branch before the
engine was rebuilt (commit fec81f9, JAX backend, `make_golden.py`), with the outputs they gave.
Every backend must load them and predict the same; a later format change adds its own files
and keeps these.
"""

import pathlib

import golden_models
import keras
import numpy as np
import pytest

from flaxlayer import FlaxLayer, JaxLayer

FILES = pathlib.Path(__file__).parent / "files"
NAMES = sorted(golden_models.BUILDERS)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _needs(name: str) -> None:
    if name == "hf_bert" and golden_models.FlaxBertForSequenceClassification is None:
        pytest.skip("the `hf` extra (transformers 4.x) is not installed")


def _expected(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FILES / f"{name}.npz")
    return data["x"], data["y"]


@pytest.mark.parametrize("name", NAMES)
def test_golden_keras_file_loads_and_predicts_what_it_gave(name):
    _needs(name)
    x, y = _expected(name)
    # compile=False: the files' compile config (Adam, jit_compile) is Keras's to read, and on
    # PyTorch a compiled predict runs torch.compile; test_golden_fine_tuned_file_keeps_its_
    # transforms loads one file compiled.
    model = keras.saving.load_model(FILES / f"{name}.keras", compile=False)
    assert any(isinstance(layer, (FlaxLayer, JaxLayer)) for layer in model.layers)
    np.testing.assert_allclose(np.asarray(model.predict(x, verbose=0)), y, **TOLERANCE)


@pytest.mark.parametrize("name", NAMES)
def test_golden_weights_file_loads_into_the_same_model_built_anew(name):
    _needs(name)
    x, y = _expected(name)
    model = golden_models.BUILDERS[name]()
    model.load_weights(FILES / f"{name}.weights.h5")
    np.testing.assert_allclose(np.asarray(model.predict(x, verbose=0)), y, **TOLERANCE)


def test_golden_fine_tuned_file_keeps_its_transforms():
    """The LoRA + int8 file loads with its int8 kernel, its adapters and its frozen base."""
    model = keras.saving.load_model(FILES / "lora_int8.keras")
    layer = model.get_layer("mlp")
    dtypes = {w.path: keras.backend.standardize_dtype(w.dtype) for w in layer.weights}
    assert dtypes["mlp/params/head/kernel"] == "int8"
    assert "mlp/lora/params/hidden/kernel/a" in dtypes
    trainable = {w.path for w in layer.trainable_weights}
    assert "mlp/params/hidden/kernel" not in trainable
    assert "mlp/lora/params/hidden/kernel/b" in trainable
