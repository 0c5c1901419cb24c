"""Point 9: Sequential, Functional, subclassed models; pytree inputs/outputs; output shapes."""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np

from conftest import make_data
from conftest import to_numpy as _np
from flaxlayer import FlaxLayer
from models import MLP, DictModule


def test_sequential_fit_predict():
    x, y = make_data(n=16)
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP()), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y[:, :1], epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2
    assert model.predict(x, verbose=0).shape == (16, 1)


def test_functional_unknown_dims_dense():
    inputs = keras.Input((None, 3))
    layer = FlaxLayer(nn.Dense(4))
    outputs = layer(inputs)
    assert isinstance(outputs, keras.KerasTensor)
    assert tuple(outputs.shape) == (None, None, 4)
    assert tuple(layer.params["params"]["kernel"].shape) == (3, 4)
    model = keras.Model(inputs, outputs)
    assert model.output_shape == (None, None, 4)
    for length in (2, 5):
        x = np.ones((3, length, 3), "float32")
        assert model.predict(x, verbose=0).shape == (3, length, 4)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 5, 3), "float32"), np.zeros((4, 5, 4), "float32"), verbose=0)


def test_output_shape_inference_unknown_and_known_dims():
    class Reduce(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            h = nn.Dense(6)(inputs)
            flat = h.reshape((h.shape[0], -1))  # depends on the unknown length
            return jnp.mean(h, axis=1), flat, h[:, :2, :]

    inputs = keras.Input((None, 3), batch_size=None)
    mean, flat, head = FlaxLayer(Reduce())(inputs)
    assert tuple(mean.shape) == (None, 6)
    assert tuple(flat.shape) == (None, None)
    assert tuple(head.shape) == (None, 2, 6)


def test_output_dtype_inferred():
    class ToInt(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            return jnp.argmax(nn.Dense(4)(inputs), axis=-1)

    out = FlaxLayer(ToInt())(keras.Input((3,)))
    assert tuple(out.shape) == (None,)
    assert "int" in out.dtype


def test_functional_dict_inputs_tuple_and_dict_outputs():
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    layer = FlaxLayer(DictModule())
    h, extra = layer(inputs)
    assert tuple(h.shape) == (None, 4)
    assert tuple(extra["mean"].shape) == (None, 1)
    model = keras.Model(inputs, [h, extra["mean"]])

    g = np.random.default_rng(0)
    data = {
        "a": g.normal(size=(16, 3)).astype("float32"),
        "b": g.normal(size=(16, 2)).astype("float32"),
    }
    targets = [np.zeros((16, 4), "float32"), np.zeros((16, 1), "float32")]
    model.compile(optimizer="adam", loss=["mse", "mse"])
    history = model.fit(data, targets, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    pred_h, pred_mean = model.predict(data, verbose=0)
    expected_h, expected_extra = DictModule().apply(layer.flax_variables, data)
    np.testing.assert_allclose(pred_h, np.asarray(expected_h), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred_mean, np.asarray(expected_extra["mean"]), rtol=1e-5, atol=1e-6)


def test_eager_pytree_inputs_list_and_outputs():
    class ListIn(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            first, second = inputs
            return {"sum": nn.Dense(2)(first) + second, "second": second}

    layer = FlaxLayer(ListIn())
    a, b = np.ones((5, 3), "float32"), np.full((5, 2), 2.0, "float32")
    out = layer([a, b])
    assert set(out) == {"sum", "second"}
    assert tuple(out["sum"].shape) == (5, 2)
    np.testing.assert_allclose(_np(out["second"]), b)


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = FlaxLayer(MLP(), name="body")
        self.head = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        return self.head(self.body(inputs, training=training))


def test_subclassed_model_fit_and_training_flag():
    x, y = make_data(n=16)
    model = Subclassed()
    model(x[:2])  # built eagerly here; built by fit below
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y[:, :1], epochs=1, batch_size=8, verbose=0)
    mean = model.body.state["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(_np(mean), 0.0)  # training=True reached the module in fit
    p1, p2 = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_allclose(p1, p2)  # dropout off at inference
    assert any(w.path.endswith("body/params/Dense_0/kernel") for w in model.weights)
    assert len(model.trainable_weights) == 6 + 2


def test_subclassed_model_built_by_fit():
    x, y = make_data(n=16)
    model = Subclassed()
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y[:, :1], epochs=1, batch_size=8, verbose=0)
    assert len(model.trainable_weights) == 6 + 2


def test_sequential_without_input_built_by_fit():
    x, y = make_data(n=16)
    model = keras.Sequential([FlaxLayer(MLP())])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.predict(x, verbose=0).shape == (16, 2)
