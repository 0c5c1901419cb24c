"""Mixed precision policies keep float32 variables and compute in the policy dtype."""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from core_models import BatchNormModule
from flaxlayer import FlaxLayer
from sample_data import make_data

X = make_data(n=8)[0]


def _float_dtypes(layer):
    return {v.dtype for v in layer.weights}


@pytest.mark.parametrize(
    ("policy", "compute"), [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_layer_dtype_argument(policy, compute):
    layer = FlaxLayer(nn.Dense(4), dtype=policy)
    out = layer(X)  # float32 inputs
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert _float_dtypes(layer) == {"float32"}
    assert layer.params["params"]["kernel"].dtype == "float32"
    assert layer.compute_dtype == compute


@pytest.mark.parametrize(
    ("policy", "compute"), [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_layer_dtype_argument_symbolic(policy, compute):
    symbolic = FlaxLayer(nn.Dense(4), dtype=policy)(keras.Input((3,)))
    assert symbolic.dtype == compute


class WrapperModel(keras.Model):
    """A subclassed model, built eagerly: exercises fit without a symbolic pass."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.inner = layer

    def call(self, inputs, training=False):
        return self.inner(inputs, training=training)


def test_mixed_bfloat16_fit_eagerly_built_model():
    x, _ = make_data(n=16)
    layer = FlaxLayer(BatchNormModule(), dtype="mixed_bfloat16")
    model = WrapperModel(layer)
    model(x[:2])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    kernel = layer.params["params"]["Dense_0"]["kernel"]
    before = keras.ops.convert_to_numpy(kernel).copy()
    history = model.fit(x, np.zeros((16, 4), "float32"), epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert _float_dtypes(layer) == {"float32"}
    assert not np.allclose(keras.ops.convert_to_numpy(kernel), before)
    mean = keras.ops.convert_to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"])
    assert mean.dtype == np.float32
    assert not np.allclose(mean, 0.0)


def test_inputs_cast_to_compute_dtype():
    class Echo(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            return inputs  # reveals the dtype the module received

    layer = FlaxLayer(Echo(), dtype="mixed_bfloat16")
    assert keras.backend.standardize_dtype(layer(X).dtype) == "bfloat16"


def test_global_mixed_policy_fit_keeps_float32_variables():
    keras.config.set_dtype_policy("mixed_float16")
    x, _ = make_data(n=16)
    layer = FlaxLayer(BatchNormModule())
    model = keras.Sequential([keras.Input((3,)), layer])
    assert layer.compute_dtype == "float16"
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, np.zeros((16, 4), "float32"), epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert _float_dtypes(layer) == {"float32"}
    mean = keras.ops.convert_to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"])
    assert mean.dtype == np.float32
    assert not np.allclose(mean, 0.0)
    assert model.predict(x, verbose=0).dtype == np.float16


def test_bfloat16_fit_updates_params():
    x, y = make_data(n=16)
    layer = FlaxLayer(nn.Dense(2), dtype="mixed_bfloat16")
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = keras.ops.convert_to_numpy(layer.params["params"]["kernel"]).copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    after = keras.ops.convert_to_numpy(layer.params["params"]["kernel"])
    assert after.dtype == np.float32
    assert not np.allclose(before, after)


def test_float32_default_unchanged():
    layer = FlaxLayer(nn.Dense(4))
    out = layer(X)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert _float_dtypes(layer) == {"float32"}


def test_bfloat16_params_are_trainable_and_train():
    # NumPy does not count bfloat16 as floating; the layer must still treat it as a param dtype.
    layer = FlaxLayer(nn.Dense(2, param_dtype=jnp.bfloat16))
    model = keras.Sequential([keras.Input((3,)), layer])
    assert [w.path for w in layer.trainable_weights] == [
        "sequential/flax_layer/params/bias",
        "sequential/flax_layer/params/kernel",
    ]
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x, y = make_data(n=16)
    before = keras.ops.convert_to_numpy(layer.params["params"]["kernel"]).astype("float32")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = keras.ops.convert_to_numpy(layer.params["params"]["kernel"]).astype("float32")
    assert not np.allclose(before, after)


def test_inference_leaves_float32_state_exactly_as_it_was():
    # Under mixed precision the module sees its BatchNorm statistics in float16; an inference
    # call does not change them, so nothing is written back (writing back would round them).
    layer = FlaxLayer(BatchNormModule(), dtype="mixed_float16")
    layer.build((None, 3))
    precise = np.full((4,), 0.1 + 1e-5, "float32")  # not representable in float16
    for variable in layer.non_trainable_weights:
        if "batch_stats" in variable.path:
            variable.assign(precise)
    layer(X)
    layer(X, training=False)
    for variable in layer.non_trainable_weights:
        if "batch_stats" in variable.path:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), precise)
    layer(X, training=True)  # training does update them
    changed = [
        not np.array_equal(keras.ops.convert_to_numpy(v), precise)
        for v in layer.non_trainable_weights
        if "batch_stats" in v.path
    ]
    assert all(changed)
