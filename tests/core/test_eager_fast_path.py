"""The eager fast path: `layer(x)` on one concrete array skips Keras's `Layer.__call__`.

Each test runs the same calls on two identical layers: one through `layer(x)`, one through
Keras's full `keras.layers.Layer.__call__`, and compares what a user sees (outputs and their
dtype, state written back, rng keys drawn, sown losses). A spy on `Layer.__call__` tells
which path a call took: none for the fast path, one per call for the cases it leaves to Keras.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from flaxlayer import FlaxLayer, JaxLayer
from helpers import to_numpy

FEATURES = 8
X64 = np.random.default_rng(0).normal(size=(4, FEATURES))  # float64: Keras casts it


class LinenNet(nn.Module):
    """State (BatchNorm), an rng stream (Dropout) and a sown loss, all driven by `train`."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        self.sow("losses", "l2", 0.01 * jnp.sum(x**2))
        return nn.Dense(3)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(FEATURES, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.norm(self.linear(x))))


def _init(rng, inputs):
    params = {"w": jax.random.normal(rng, (inputs.shape[-1], 3))}
    return params, {"count": jnp.zeros((), jnp.float32)}


def _call(params, state, rng, inputs, training):
    y = inputs @ params["w"]
    if training:
        y = y * jax.random.bernoulli(rng, 0.5, y.shape)
        state = {"count": state["count"] + 1}
    return y, state


KINDS = {
    "linen": lambda **kw: FlaxLayer(LinenNet(), seed=7, **kw),
    "nnx": lambda **kw: FlaxLayer(NNXNet(nnx.Rngs(0)), seed=7, **kw),
    "jax_layer": lambda **kw: JaxLayer(_call, _init, seed=7, **kw),
}


@pytest.fixture
def keras_calls(monkeypatch):
    """The layers Keras's `Layer.__call__` ran for, in order."""
    calls = []
    original = keras.layers.Layer.__call__

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", spy)
    return calls


def _pair(kind, **kwargs):
    """Two identical built layers."""
    layers = [KINDS[kind](**kwargs) for _ in range(2)]
    for layer in layers:
        layer(X64.astype("float32"))
    return layers


def _seen(layer):
    """What a user can observe of a layer after a call."""
    seed = getattr(layer, "seed_generator", None)
    return {
        "weights": [to_numpy(w) for w in layer.weights],
        "seed": None if seed is None else to_numpy(seed.state.value),
        "losses": [float(to_numpy(loss)) for loss in layer.losses],
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key], strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=key)
        elif a[key] is None:
            assert b[key] is None, key
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


CALLS = [  # (inputs, training): NumPy float64, backend arrays, each flag
    (lambda: X64, True),
    (lambda: X64, None),
    (lambda: keras.ops.convert_to_tensor(X64, "float32"), False),
    (lambda: keras.ops.convert_to_tensor(X64, "float32"), True),
]


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_matches_keras_call(kind, keras_calls):
    fast, full = _pair(kind)
    keras_calls.clear()
    for make_inputs, training in CALLS:
        kwargs = {} if training is None else {"training": training}
        out_fast = fast(make_inputs(), **kwargs)
        assert keras_calls == [], "layer(x) went through Keras's Layer.__call__"
        out_full = keras.layers.Layer.__call__(full, make_inputs(), **kwargs)
        keras_calls.clear()
        assert keras.backend.standardize_dtype(out_fast.dtype) == "float32"
        np.testing.assert_allclose(to_numpy(out_fast), to_numpy(out_full), rtol=1e-6, atol=1e-6)
        _assert_same(_seen(fast), _seen(full))
    # The calls did what they should: training calls moved the state and drew keys.
    fresh = KINDS[kind]()
    fresh(X64.astype("float32"))
    assert not all(
        np.array_equal(a, to_numpy(b))
        for a, b in zip(_seen(fast)["weights"], fresh.weights, strict=True)
    )


def test_training_flag_and_losses_through_fast_path(keras_calls):
    layer, _ = _pair("linen")
    keras_calls.clear()
    x = X64.astype("float32")
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(layer(x, training=False)))
    assert not np.array_equal(to_numpy(layer(x, training=True)), to_numpy(layer(x)))
    assert len(layer.losses) == 1  # each call's sown loss replaces the previous call's
    assert keras_calls == []


def test_uniform_low_precision_policy_casts_inputs_on_fast_path(keras_calls):
    fast, full = _pair("jax_layer", dtype="float16")
    keras_calls.clear()
    out = fast(X64)
    assert keras_calls == []
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    np.testing.assert_array_equal(to_numpy(out), to_numpy(keras.layers.Layer.__call__(full, X64)))


def _keras_path_takes(layer, keras_calls, *args, **kwargs):
    """Calls `layer`, and checks that Keras's `Layer.__call__` ran for it."""
    keras_calls.clear()
    out = layer(*args, **kwargs)
    assert layer in keras_calls, "expected Keras's Layer.__call__ to take this call"
    return out


def test_mixed_precision_takes_keras_path(keras_calls):
    fast, full = _pair("linen", dtype="mixed_float16")
    out = _keras_path_takes(fast, keras_calls, X64)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    np.testing.assert_array_equal(to_numpy(out), to_numpy(keras.layers.Layer.__call__(full, X64)))


def test_unbuilt_layer_takes_keras_path(keras_calls):
    layer = KINDS["linen"]()
    _keras_path_takes(layer, keras_calls, X64)
    assert layer.built


def test_masked_input_takes_keras_path(keras_calls):
    layer, _ = _pair("linen")
    masked = keras.layers.Masking(0.0)(keras.ops.convert_to_tensor(X64, "float32"))
    with pytest.warns(UserWarning, match="does not support masking"):
        _keras_path_takes(layer, keras_calls, masked)


def test_symbolic_input_takes_keras_path(keras_calls):
    layer, _ = _pair("linen")
    out = _keras_path_takes(layer, keras_calls, keras.Input((FEATURES,)))
    assert tuple(out.shape) == (None, 3)


def test_other_dtype_tensor_takes_keras_path(keras_calls):
    layer, full = _pair("linen")
    x = keras.ops.convert_to_tensor(X64, "float16")
    out = _keras_path_takes(layer, keras_calls, x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(out), to_numpy(keras.layers.Layer.__call__(full, x)))


def test_structured_inputs_and_other_arguments_take_keras_path(keras_calls):
    def call_fn(params, inputs):
        return inputs["a"] @ params["w"]

    layer = JaxLayer(call_fn, params={"w": np.ones((FEATURES, 2), "float32")})
    inputs = {"a": X64.astype("float32")}
    layer(inputs)
    _keras_path_takes(layer, keras_calls, inputs)
    plain, _ = _pair("linen")
    keras_calls.clear()
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask'"):
        plain(X64, training=False, mask=None)  # Keras's own error for an argument `call` lacks
    assert keras_calls == [plain]


def test_stateless_scope_takes_keras_path(keras_calls):
    layer, _ = _pair("linen")
    with keras.StatelessScope():
        _keras_path_takes(layer, keras_calls, X64, training=True)
    # The scope kept the training call's state change to itself.
    assert all(
        np.array_equal(to_numpy(a), to_numpy(b))
        for a, b in zip(layer.weights, _pair("linen")[0].weights, strict=True)
    )


def test_nested_call_takes_keras_path(keras_calls):
    class Outer(keras.layers.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=None):
            return self.inner(x, training=training)

    layer, full = _pair("linen")
    outer = Outer(layer)
    keras_calls.clear()
    out = outer(X64, training=True)
    assert keras_calls == [outer, layer]
    expected = keras.layers.Layer.__call__(full, X64, training=True)
    np.testing.assert_allclose(to_numpy(out), to_numpy(expected), rtol=1e-6)


def test_subclass_with_own_call_takes_keras_path(keras_calls):
    class Scaled(FlaxLayer):
        def call(self, inputs, training=None):
            return 2 * super().call(inputs, training=training)

    layer = Scaled(LinenNet(), seed=7)
    layer(X64)
    out = _keras_path_takes(layer, keras_calls, X64)
    reference, _ = _pair("linen")
    np.testing.assert_allclose(to_numpy(out), 2 * to_numpy(reference(X64)), rtol=1e-6)


def test_distribution_scope_takes_keras_path(keras_calls):
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution lays variables out on JAX devices only")
    layer, _ = _pair("linen")
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:1])
    with distribution.scope():
        _keras_path_takes(layer, keras_calls, X64)


def test_traced_call_takes_keras_path(keras_calls):
    layer, full = _pair("jax_layer")
    x = X64.astype("float32")
    backend = keras.backend.backend()
    if backend == "jax":
        traced = jax.jit(lambda v: layer(v))
    elif backend == "tensorflow":
        import tensorflow as tf

        traced = tf.function(lambda v: layer(v))
    else:
        pytest.skip("torch traces through torch.compile, whose compile time is not for a unit test")
    keras_calls.clear()
    out = traced(keras.ops.convert_to_tensor(x))
    assert layer in keras_calls
    np.testing.assert_allclose(to_numpy(out), to_numpy(full(x)), rtol=1e-6)


def test_layer_rebuilt_without_weights_gets_its_values_first(keras_calls):
    # Its variables have no values until first used (a weights file usually follows): that
    # first call must give them the module's initial values, as Keras's path does.
    layer, _ = _pair("linen")
    rebuilt = FlaxLayer.from_config(layer.get_config())
    rebuilt.build_from_config(layer.get_build_config())
    np.testing.assert_allclose(to_numpy(rebuilt(X64)), to_numpy(layer(X64)), rtol=1e-6)
    keras_calls.clear()
    rebuilt(X64)  # its variables now have values: the fast path takes the call
    assert keras_calls == []
