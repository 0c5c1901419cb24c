"""JaxLayer serves Haiku's transform / transform_with_state pairs."""

import haiku as hk
import jax
import keras
import numpy as np

from flaxlayer import JaxLayer
from helpers import to_numpy
from sample_data import make_data


def _mlp_forward(inputs, training):
    x = hk.Linear(8)(inputs)
    x = jax.nn.relu(x)
    if training:
        x = hk.dropout(hk.next_rng_key(), 0.5, x)
    return hk.Linear(2)(x)


def test_haiku_transform_fit():
    transformed = hk.transform(_mlp_forward)
    layer = JaxLayer(call_fn=transformed.apply, init_fn=transformed.init)
    model = keras.Sequential([keras.Input((3,)), layer])
    paths = {w.path for w in layer.trainable_weights}
    # Haiku's "linear_1" module names become nested variable paths.
    assert "sequential/jax_layer/params/linear/w" in paths
    assert "sequential/jax_layer/params/linear_1/b" in paths
    assert len(paths) == 4
    assert model.count_params() == 3 * 8 + 8 + 8 * 2 + 2

    x, y = make_data(n=16)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = to_numpy(layer.params["linear"]["w"]).copy()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert not np.allclose(to_numpy(layer.params["linear"]["w"]), before)

    # Inference is deterministic and equals Haiku's apply with the layer's params.
    params = jax.tree.map(lambda v: to_numpy(v), layer.params)
    expected = transformed.apply(params, None, x, False)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    # Dropout in training uses fresh keys.
    t1, t2 = to_numpy(layer(x, training=True)), to_numpy(layer(x, training=True))
    assert not np.allclose(t1, t2)


def _bn_forward(inputs, training):
    x = hk.Linear(4)(inputs)
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.5)(x, training)


def _counter_forward(inputs, training):
    calls = hk.get_state("calls", (), dtype=np.int32, init=np.zeros)
    mean = hk.get_state("mean", (inputs.shape[-1],), dtype=np.float32, init=np.zeros)
    if training:
        hk.set_state("calls", calls + 1)
        hk.set_state("mean", 0.5 * mean + 0.5 * inputs.mean(axis=0))
    return hk.Linear(2)(inputs - mean)


def _state_weights(layer):
    return {
        w.path.split("/state/", 1)[1]: w for w in layer.non_trainable_weights if "/state/" in w.path
    }


def _check_state_fit_and_inference(model, layer, x, y):
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    snapshot = {k: to_numpy(w).copy() for k, w in _state_weights(layer).items()}
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    for k, w in _state_weights(layer).items():
        np.testing.assert_array_equal(to_numpy(w), snapshot[k])
    return snapshot


def test_haiku_transform_with_state_get_set_state_fit():
    transformed = hk.transform_with_state(_counter_forward)
    layer = JaxLayer(call_fn=transformed.apply, init_fn=transformed.init)
    model = keras.Sequential([keras.Input((3,)), layer])
    # Haiku's top-level state bundle "~" ("~/calls"): the "~" is left out of paths.
    assert set(_state_weights(layer)) == {"calls", "mean"}
    assert {w.path for w in layer.trainable_weights} == {
        "sequential/jax_layer/params/linear/w",
        "sequential/jax_layer/params/linear/b",
    }
    x, y = make_data(n=16)
    snapshot = _check_state_fit_and_inference(model, layer, x + 3.0, y)
    assert int(snapshot["calls"]) == 2
    assert not np.allclose(snapshot["mean"], 0.0)


def test_haiku_batchnorm_with_training_init_wrapper():
    transformed = hk.transform_with_state(_bn_forward)

    def init_fn(rng, inputs):  # Haiku's BatchNorm must be initialized in training mode
        return transformed.init(rng, inputs, True)

    layer = JaxLayer(call_fn=transformed.apply, init_fn=init_fn)
    model = keras.Sequential([keras.Input((3,)), layer])
    state = _state_weights(layer)
    assert "batch_norm/mean_ema/average" in state
    x, _ = make_data(n=16)
    snapshot = _check_state_fit_and_inference(
        model, layer, x * 2.0 + 3.0, np.zeros((16, 4), "float32")
    )
    assert not np.allclose(snapshot["batch_norm/mean_ema/average"], 0.0)


def test_haiku_batchnorm_transform_with_state_pair_as_is():
    transformed = hk.transform_with_state(_bn_forward)
    layer = JaxLayer(call_fn=transformed.apply, init_fn=transformed.init)
    model = keras.Sequential([keras.Input((3,)), layer])
    x, _ = make_data(n=16)
    snapshot = _check_state_fit_and_inference(
        model, layer, x * 2.0 + 3.0, np.zeros((16, 4), "float32")
    )
    assert not np.allclose(snapshot["batch_norm/mean_ema/average"], 0.0)


def test_haiku_no_rng_in_apply():
    transformed = hk.without_apply_rng(hk.transform(lambda inputs: hk.Linear(3)(inputs)))
    layer = JaxLayer(call_fn=transformed.apply, init_fn=transformed.init)
    x = np.ones((2, 5), "float32")
    out = to_numpy(layer(x))
    params = jax.tree.map(lambda v: to_numpy(v), layer.params)
    np.testing.assert_allclose(out, transformed.apply(params, x), rtol=1e-6)


def test_nested_haiku_modules_train_with_adam():
    # Nested Haiku modules are named "mlp/~/linear_0": TensorFlow's optimizer slot names may
    # not contain "~", so the variable paths leave it out.
    transformed = hk.transform(lambda inputs: hk.nets.MLP([4, 2])(inputs))
    layer = JaxLayer(call_fn=transformed.apply, init_fn=transformed.init)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert "sequential/jax_layer/params/mlp/linear_0/w" in {w.path for w in layer.weights}
    model.compile(optimizer="adam", loss="mse")
    x, y = make_data(n=16)
    before = [to_numpy(w).copy() for w in layer.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(
        not np.allclose(b, to_numpy(w))
        for b, w in zip(before, layer.trainable_weights, strict=True)
    )
