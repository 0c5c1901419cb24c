"""`model.export(format=...)` with a FlaxLayer in the model, on the backend under test.

ONNX works on all three backends (checked in onnxruntime at two batch sizes, and the layer
works unchanged afterwards), tf_saved_model from JAX and TensorFlow, LiteRT from TensorFlow;
OpenVINO fails before its converter runs with an error that shows the working route (ONNX,
which OpenVINO reads), and that route is checked. `SUPPORT` is the table docs/export.md shows:
a test compares the two.
"""

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from flax import nnx

import serialization_models as sm
from backend_models import ConvBN, NNXBatchNormDropout
from flaxlayer import FlaxLayer

BACKEND = keras.backend.backend()
DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "export.md"

# format -> backend -> what docs/export.md says (the start of its cell).
SUPPORT = {
    "onnx": {"jax": "yes", "tensorflow": "yes", "torch": "yes"},
    "tf_saved_model": {"jax": "yes", "tensorflow": "yes", "torch": "no"},
    "litert": {"jax": "no", "tensorflow": "yes", "torch": "not tested"},
    "openvino": {"jax": "no", "tensorflow": "via ONNX", "torch": "via ONNX"},
}
# What each format needs installed on each backend, besides Keras.
NEEDS = {
    "onnx": {
        "jax": ["jax2onnx", "onnxruntime"],
        "tensorflow": ["tf2onnx", "jax2onnx", "onnxruntime"],
        "torch": ["onnx", "jax2onnx", "onnxruntime"],
    },
    "litert": {"tensorflow": ["ai_edge_litert"]},
}


def _needs(fmt: str) -> None:
    for package in NEEDS[fmt][BACKEND]:
        pytest.importorskip(package)


def _model(kind: str) -> tuple[keras.Model, np.ndarray]:
    """A small Keras model around a FlaxLayer (BatchNorm and dropout in it), fitted a little."""
    keras.utils.set_random_seed(0)
    if kind == "conv":
        shape, module = (6, 6, 1), ConvBN(features=4)
    elif kind == "nnx":
        shape, module = (5,), NNXBatchNormDropout(5, 4, rngs=nnx.Rngs(0))
    else:
        shape, module = (5,), sm.BatchNormDropoutNet(hidden=8, out=4, rate=0.5)
    inputs = keras.Input(shape)
    outputs = keras.layers.Dense(2)(FlaxLayer(module, name="flax")(inputs))
    model = keras.Model(inputs, outputs)
    g = np.random.default_rng(0)
    x = g.normal(size=(32, *shape)).astype("float32")
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, g.normal(size=(32, 2)).astype("float32"), epochs=1, batch_size=8, verbose=0)
    model(x[:1])  # Keras's exporters refuse a model it never called directly
    return model, x


def _onnx_outputs(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _assert_layer_still_works(model: keras.Model, x: np.ndarray, before: np.ndarray) -> None:
    np.testing.assert_allclose(model.predict(x, verbose=0), before, atol=1e-6)
    layer = model.get_layer("flax")
    weights = [np.array(w) for w in layer.get_weights()]
    model.fit(x, np.zeros((len(x), 2), "float32"), epochs=1, batch_size=8, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(weights, layer.get_weights(), strict=True))
    assert np.isfinite(model.predict(x, verbose=0)).all()


@pytest.mark.parametrize("kind", ["linen", "nnx", "conv"])
def test_onnx_matches_predict_at_two_batch_sizes(kind, tmp_path):
    _needs("onnx")
    model, x = _model(kind)
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    for batch in (32, 5):
        np.testing.assert_allclose(_onnx_outputs(path, x[:batch]), before[:batch], atol=1e-5)
    _assert_layer_still_works(model, x, before)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_tf_saved_model_serves_the_same_outputs(kind, tmp_path):
    if SUPPORT["tf_saved_model"][BACKEND] != "yes":
        pytest.skip("from torch Keras exports through torch.export, which cannot trace JAX")
    tf = pytest.importorskip("tensorflow")
    model, x = _model(kind)
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "saved")
    model.export(path, format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(path)
    for batch in (32, 5):
        got = served.serve(tf.constant(x[:batch])).numpy()
        np.testing.assert_allclose(got, before[:batch], atol=1e-5)
    _assert_layer_still_works(model, x, before)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_litert_from_tensorflow(kind, tmp_path):
    if BACKEND != "tensorflow":
        pytest.skip("LiteRT export with a FlaxLayer: the TensorFlow backend (see docs/export.md)")
    _needs("litert")
    from ai_edge_litert.interpreter import Interpreter

    model, x = _model(kind)
    before = model.predict(x, verbose=0)
    path = str(tmp_path / "model.tflite")
    model.export(path, format="litert", verbose=False)
    interpreter = Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    for batch in (32, 5):
        interpreter.resize_tensor_input(index, x[:batch].shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, x[:batch])
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(got, before[:batch], atol=1e-5)


def test_openvino_fails_before_its_converter_and_names_the_route(tmp_path, monkeypatch):
    if BACKEND == "jax":
        pytest.skip("from JAX, Keras's OpenVINO export fails for its own layers too")
    ov = pytest.importorskip("openvino")
    converted = []
    real_convert = ov.convert_model

    def convert_model(*args, **kwargs):
        converted.append(args)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(ov, "convert_model", convert_model)
    model, _ = _model("linen")
    path = str(tmp_path / "model.xml")
    with pytest.raises(Exception) as raised:
        model.export(path, format="openvino", verbose=False)
    message = str(raised.value)
    assert "'flax'" in message and "format='openvino'" in message and BACKEND in message
    assert 'format="onnx"' in message and "ov.convert_model" in message
    assert converted == []  # failed before OpenVINO's converter saw anything
    assert list(tmp_path.iterdir()) == []


def test_openvino_reads_the_onnx_export(tmp_path):
    """The route the OpenVINO error shows: ONNX, converted by OpenVINO."""
    _needs("onnx")
    ov = pytest.importorskip("openvino")
    model, x = _model("conv")
    before = model.predict(x, verbose=0)
    onnx_path, xml_path = str(tmp_path / "model.onnx"), str(tmp_path / "model.xml")
    model.export(onnx_path, format="onnx", verbose=False)
    ov.save_model(ov.convert_model(onnx_path), xml_path)
    compiled = ov.Core().compile_model(xml_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (32, 5):
        # OpenVINO's CPU kernels (convolutions) round differently from XLA's.
        np.testing.assert_allclose(compiled(x[:batch])[0], before[:batch], atol=1e-3)


def test_torch_jit_trace_says_what_works_instead():
    if BACKEND != "torch":
        pytest.skip("torch.jit.trace: the PyTorch backend")
    import torch

    model, x = _model("linen")
    with pytest.raises(Exception, match=r"(?s)'flax'.*torch\.jit\.trace.*format=\"onnx\""):
        torch.jit.trace(model, (torch.from_numpy(x[:1]),))


def test_support_table_in_the_docs_is_this_one():
    rows = {}
    for line in DOCS_PAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (match := re.fullmatch(r"`(\w+)`", cells[0])):
            rows[match.group(1)] = dict(zip(("jax", "tensorflow", "torch"), cells[1:], strict=True))
    assert rows.keys() == SUPPORT.keys()
    for fmt, by_backend in SUPPORT.items():
        for backend, expected in by_backend.items():
            assert rows[fmt][backend].startswith(expected), (fmt, backend, rows[fmt][backend])
