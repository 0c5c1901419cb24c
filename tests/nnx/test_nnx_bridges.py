"""Linen modules through nnx.bridge.ToNNX, NNX modules through nnx.bridge.ToLinen."""

import keras
import numpy as np
from flax import nnx

from flaxlayer import FlaxLayer
from helpers import to_numpy
from nnx_models import LinenMLP, SimpleNNX
from sample_data import make_data


def call_positionally(module, inputs):
    return module(inputs)


def _to_nnx(x):
    model = nnx.bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x[:1])
    return model


def _to_linen():
    return nnx.bridge.ToLinen(SimpleNNX, args=(3, 2))


def _fit_and_check(layer, x, y):
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse")
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    assert len(before) == 4
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(
        not np.allclose(b, to_numpy(v))
        for b, v in zip(before, model.trainable_weights, strict=True)
    )
    assert model.predict(x, verbose=0).shape == (len(x), 2)
    return model


def test_to_nnx_with_a_method_function_trains():
    x, y = make_data()
    model = _to_nnx(x)
    expected = np.asarray(model(x))
    layer = FlaxLayer(model, method=call_positionally)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-6)
    assert {v.path for v in layer.trainable_weights} == {
        "flax_layer/Dense_0/kernel",
        "flax_layer/Dense_0/bias",
        "flax_layer/Dense_1/kernel",
        "flax_layer/Dense_1/bias",
    }
    trained = _fit_and_check(layer, x, y)
    # Back to the bridged module.
    nnx.update(model, layer.flax_variables)
    np.testing.assert_allclose(np.asarray(model(x)), trained.predict(x, verbose=0), atol=1e-5)


def test_to_linen_with_a_method_function_trains():
    x, y = make_data()
    layer = FlaxLayer(_to_linen(), method=call_positionally)
    layer(x)
    assert all(v.path.startswith("flax_layer/params/linear") for v in layer.trainable_weights)
    _fit_and_check(layer, x, y)


def test_to_nnx_as_is_trains():
    x, y = make_data()
    model = _to_nnx(x)
    expected = np.asarray(model(x))
    layer = FlaxLayer(model)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-6)
    _fit_and_check(layer, x, y)


def test_to_linen_as_is_trains():
    x, y = make_data()
    _fit_and_check(FlaxLayer(_to_linen()), x, y)
