"""Sequential, Functional and subclassed models; pytree inputs and outputs; output shapes.

Behaviours that hold for Linen and NNX alike are one test parametrized by module kind: a Linen
`MLP` and an NNX `MLP` (3 -> 8 -> 2 with BatchNorm and dropout, the same weight counts). A
Sequential model of either kind is trained in test_keras_workflows.py.
"""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import nnx_models
from core_models import MLP, DictModule
from flaxlayer import FlaxLayer
from helpers import changed_paths, flax_inference, to_numpy, weight_named
from sample_data import make_data, normal_data

KINDS = {"linen": MLP, "nnx": lambda: nnx_models.MLP(3, 2, rngs=nnx.Rngs(0))}


def _assert_all_trained(before, variables):
    assert changed_paths(before, variables) == [v.path for v in variables]


@pytest.mark.parametrize("kind", KINDS)
def test_functional_model_with_unknown_batch_and_length(kind):
    inputs = keras.Input((None, 3))
    layer = FlaxLayer(KINDS[kind]())
    outputs = layer(inputs)
    assert isinstance(outputs, keras.KerasTensor)
    assert tuple(outputs.shape) == (None, None, 2)
    # The kernels are built from the known feature size alone.
    kernels = sorted(tuple(v.shape) for v in layer.trainable_weights if v.path.endswith("kernel"))
    assert kernels == [(3, 8), (8, 2)]
    model = keras.Model(inputs, outputs)
    assert model.output_shape == (None, None, 2)
    model.compile(optimizer="adam", loss="mse")
    x, y = normal_data(16 * 5, 3).reshape(16, 5, 3), normal_data(16 * 5, 2, 1).reshape(16, 5, 2)
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    _assert_all_trained(before, model.trainable_weights)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.evaluate(x, y, verbose=0))
    predicted = model.predict(x, verbose=0)
    assert predicted.shape == (16, 5, 2)
    # Any batch size and length work once built (the module works position by position).
    short = model.predict(x[:3, :2], verbose=0)
    assert short.shape == (3, 2, 2)
    np.testing.assert_allclose(short, predicted[:3, :2], atol=1e-5)


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


DICT_KINDS = {"linen": DictModule, "nnx": lambda: nnx_models.DictNet(rngs=nnx.Rngs(0))}


@pytest.mark.parametrize("kind", DICT_KINDS)
def test_functional_dict_inputs_tuple_and_dict_outputs(kind):
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    layer = FlaxLayer(DICT_KINDS[kind]())
    h, extra = layer(inputs)
    assert tuple(h.shape) == (None, 4)
    assert tuple(extra["mean"].shape) == (None, 1)
    model = keras.Model(inputs, [h, extra["mean"]])

    g = np.random.default_rng(0)
    data = {
        "a": g.normal(size=(16, 3)).astype("float32"),
        "b": g.normal(size=(16, 2)).astype("float32"),
    }
    targets = [g.normal(size=(16, 4)).astype("float32"), g.normal(size=(16, 1)).astype("f4")]
    model.compile(optimizer="adam", loss=["mse", "mse"])
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    history = model.fit(data, targets, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _assert_all_trained(before, model.trainable_weights)

    pred_h, pred_mean = model.predict(data, verbose=0)
    assert pred_h.shape == (16, 4) and pred_mean.shape == (16, 1)
    expected_h, expected_extra = flax_inference(layer, data)
    np.testing.assert_allclose(pred_h, expected_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred_mean, expected_extra["mean"], rtol=1e-5, atol=1e-6)
    # An eager call gives the same tuple.
    out = layer(data)
    assert isinstance(out, tuple) and len(out) == 2
    np.testing.assert_allclose(to_numpy(out[0]), pred_h, atol=1e-5)
    np.testing.assert_allclose(to_numpy(out[1]["mean"]), pred_mean, atol=1e-5)


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
    np.testing.assert_allclose(to_numpy(out["second"]), b)


class Subclassed(keras.Model):
    def __init__(self, module, **kwargs):
        super().__init__(**kwargs)
        self.body = FlaxLayer(module, name="body")
        self.head = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        return self.head(self.body(inputs, training=training))


FIRST_KERNEL = {"linen": "body/params/Dense_0/kernel", "nnx": "body/linear1/kernel"}


@pytest.mark.parametrize("kind", KINDS)
def test_subclassed_model_fit_and_training_flag(kind):
    x, y = make_data(n=16, out_dim=1)
    model = Subclassed(KINDS[kind]())
    model(x[:2])  # built eagerly here; built by fit in the next test
    model.compile(optimizer="adam", loss="mse")
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    _assert_all_trained(before, model.trainable_weights)
    mean = weight_named(model.body, "mean")
    assert not np.allclose(to_numpy(mean), 0.0)  # training=True reached the module in fit
    assert np.isfinite(model.evaluate(x, y, verbose=0))
    p1, p2 = model.predict(x, verbose=0), model.predict(x, verbose=0)
    assert p1.shape == (16, 1)
    np.testing.assert_allclose(p1, p2)  # dropout off at inference
    assert any(w.path.endswith(FIRST_KERNEL[kind]) for w in model.weights)
    assert len(model.trainable_weights) == 6 + 2


@pytest.mark.parametrize("kind", KINDS)
def test_subclassed_model_built_by_fit(kind):
    module = KINDS[kind]()
    if kind == "nnx":  # an NNX module comes with values (and gives its arrays to the layer)
        initial = np.asarray(module.linear1.kernel.get_value()).copy()
    model = Subclassed(module)
    model.compile(optimizer="adam", loss="mse")
    x, y = make_data(n=16, out_dim=1)
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # builds the model
    assert np.isfinite(history.history["loss"]).all()
    assert len(model.trainable_weights) == 6 + 2
    kernel = weight_named(model, FIRST_KERNEL[kind])
    assert tuple(kernel.shape) == (3, 8)
    if kind == "nnx":  # fit trained the module's own values
        assert not np.allclose(to_numpy(kernel), initial)
    assert model.predict(x, verbose=0).shape == (16, 1)


def test_sequential_without_input_built_by_fit():
    x, y = make_data(n=16)
    model = keras.Sequential([FlaxLayer(MLP())])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert model.predict(x, verbose=0).shape == (16, 2)
