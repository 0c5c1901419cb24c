"""model.export(format="tf_saved_model") from the JAX backend."""

import keras
import numpy as np
import pytest

import serialization_models as sm
from flaxlayer import FlaxLayer


def _fitted(model, in_dim=5, out_dim=2):
    g = np.random.default_rng(0)
    x = g.normal(size=(16, in_dim)).astype("float32")
    y = g.normal(size=(16, out_dim)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    return model


def _sequential():
    return keras.Sequential(
        [keras.Input((5,)), FlaxLayer(sm.BatchNormDropoutNet(hidden=8, out=2, rate=0.5))]
    )


def _functional():
    inputs = keras.Input((5,))
    hidden = FlaxLayer(sm.BatchNormDropoutNet(hidden=8, out=4, rate=0.5))(inputs)
    outputs = keras.layers.Dense(2)(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("make", [_sequential, _functional], ids=["sequential", "functional"])
def test_export_tf_saved_model_matches_keras(make, tmp_path):
    if keras.backend.backend() == "torch":
        pytest.skip(
            "from the torch backend Keras exports through torch.export, which cannot trace JAX"
        )
    tf = pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    model = _fitted(make())
    layer = next(lay for lay in model.layers if isinstance(lay, FlaxLayer))
    stats = layer.state["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(keras.ops.convert_to_numpy(stats), 0.0)  # fitted state is exported

    path = str(tmp_path / "exported")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)

    g = np.random.default_rng(1)
    for batch in (1, 3, 7):
        x = g.normal(size=(batch, 5)).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        got = reloaded.serve(tf.constant(x)).numpy()
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        # Inference mode in the export: dropout off, so repeated calls agree.
        np.testing.assert_array_equal(reloaded.serve(tf.constant(x)).numpy(), got)


def _xla_call_module_platforms(concrete_function) -> list[list[bytes]]:
    found = []

    def walk(graph):
        found.extend(
            list(op.get_attr("platforms"))
            for op in graph.get_operations()
            if op.type == "XlaCallModule"
        )
        for inner in graph._functions.values():
            if hasattr(inner, "graph"):
                walk(inner.graph)

    walk(concrete_function.graph)
    return found


def test_exported_saved_model_lists_every_requested_platform(tmp_path):
    """A SavedModel exported on this CPU machine for ("cpu", "cuda") also serves on a GPU:
    from TensorFlow through the layer's `native_serialization_platforms`, from JAX through
    Keras's own `export(..., jax2tf_kwargs=...)`."""
    backend = keras.backend.backend()
    if backend == "torch":
        pytest.skip("a SavedModel is exported from the JAX and TensorFlow backends")
    tf = pytest.importorskip("tensorflow")
    platforms = ("cpu", "cuda")
    layer_kwargs = {"native_serialization_platforms": platforms} if backend != "jax" else {}
    layer = FlaxLayer(sm.Block(), **layer_kwargs)
    model = _fitted(keras.Sequential([keras.Input((5,)), layer]), out_dim=4)
    export_kwargs = (
        {"jax2tf_kwargs": {"native_serialization_platforms": platforms}} if backend == "jax" else {}
    )
    path = str(tmp_path / "served")
    model.export(path, format="tf_saved_model", verbose=False, **export_kwargs)
    served = tf.saved_model.load(path)
    x = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    np.testing.assert_allclose(served.serve(x), model.predict(x, verbose=0), atol=1e-5)
    found = _xla_call_module_platforms(
        served.serve.get_concrete_function(tf.TensorSpec((None, 5), tf.float32))
    )
    assert found and all(p == [b"CPU", b"CUDA"] for p in found), found
