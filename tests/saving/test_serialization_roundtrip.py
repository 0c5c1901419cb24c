"""model.save / load_model round trips without user code.

A model holding a FlaxLayer (Sequential and Functional) saves and loads with no
get_config/from_config/registration: same predictions (bitwise), same trainable and
non-trainable values, same optimizer state, and `fit` goes on exactly where it stopped.
Every form of `method` round-trips.
JaxLayer round-trips with registered functions, with custom_objects, and with `params=`.
get_config is JSON; serialize_keras_object / deserialize_keras_object round-trip.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import serialization_models as sm
from flaxlayer import FlaxLayer, JaxLayer
from helpers import save_load, to_numpy
from sample_data import image_data, make_data


def _paths(variables):
    # A Sequential builds its layers under its own name scope; a loaded one does not (plain
    # Keras layers behave the same), so compare paths below the model's scope.
    return [v.path.removeprefix("sequential/") for v in variables]


def _model_state(variables):
    # Keras does not save seed generator states (for its own layers neither): RNG state, not
    # model state.
    return [v for v in variables if "seed_generator" not in v.path]


def assert_same_values(a_vars, b_vars):
    a_vars, b_vars = _model_state(a_vars), _model_state(b_vars)
    assert _paths(a_vars) == _paths(b_vars)
    for a, b in zip(a_vars, b_vars, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


def assert_same_model_state(original, loaded, x):
    np.testing.assert_array_equal(original.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert_same_values(original.trainable_variables, loaded.trainable_variables)
    assert_same_values(original.non_trainable_variables, loaded.non_trainable_variables)
    assert int(loaded.optimizer.iterations) == int(original.optimizer.iterations) > 0
    assert len(loaded.optimizer.variables) == len(original.optimizer.variables) > 1
    for a, b in zip(original.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


# ----------------------------------------------------------------- models holding a FlaxLayer


def _seed_sequential():
    model = keras.Sequential([keras.Input((8, 8, 1)), FlaxLayer(sm.MyFlaxModule())])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model, image_data()


def _batchnorm_functional():
    inputs = keras.Input((5,))
    hidden = FlaxLayer(sm.BatchNormNet(hidden=8, out=4))(inputs)
    outputs = keras.layers.Dense(3)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    return model, make_data(12, 5, 3)


def _batchnorm_sequential():
    model = keras.Sequential([keras.Input((5,)), FlaxLayer(sm.BatchNormNet())])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model, make_data(12, 5, 3)


@pytest.mark.parametrize(
    "make",
    [_seed_sequential, _batchnorm_functional, _batchnorm_sequential],
    ids=["seed-example-sequential", "batchnorm-functional", "batchnorm-sequential-sgd"],
)
def test_model_with_flax_layer_round_trips(make, tmp_path):
    keras.utils.set_random_seed(0)
    model, (x, y) = make()
    model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)

    loaded = save_load(model, tmp_path)

    assert type(loaded) is type(model)
    flax_layers = [layer for layer in loaded.layers if isinstance(layer, FlaxLayer)]
    assert len(flax_layers) == 1
    original_layer = next(layer for layer in model.layers if isinstance(layer, FlaxLayer))
    assert type(flax_layers[0].module) is type(original_layer.module)
    assert flax_layers[0].module == original_layer.module
    assert_same_model_state(model, loaded, x)

    # Training goes on where it stopped: one more epoch on both gives the same weights.
    before = [to_numpy(v).copy() for v in loaded.trainable_variables]
    model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    after = [to_numpy(v) for v in loaded.trainable_variables]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-6, err_msg=a.path)


def test_batchnorm_state_is_saved_not_reinitialized(tmp_path):
    keras.utils.set_random_seed(0)
    model, (x, y) = _batchnorm_sequential()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    layer = model.layers[0]
    stats = layer.state["batch_stats"]["BatchNorm_0"]
    # Fitting moved the running statistics away from their initial values (0 and 1).
    assert not np.allclose(to_numpy(stats["mean"]), 0.0)
    assert not np.allclose(to_numpy(stats["var"]), 1.0)

    loaded = save_load(model, tmp_path)

    loaded_stats = loaded.layers[0].state["batch_stats"]["BatchNorm_0"]
    np.testing.assert_array_equal(to_numpy(loaded_stats["mean"]), to_numpy(stats["mean"]))
    np.testing.assert_array_equal(to_numpy(loaded_stats["var"]), to_numpy(stats["var"]))
    assert _paths(_model_state(loaded.layers[0].non_trainable_variables)) == _paths(
        _model_state(layer.non_trainable_variables)
    )


def test_uncompiled_model_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), FlaxLayer(sm.MyFlaxModule())])
    x, _ = image_data(4)
    loaded = save_load(model, tmp_path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert loaded.count_params() == model.count_params()


# --------------------------------------------------------------------- every form of `method`


def _two_inputs(n=6, seed=0):
    g = np.random.default_rng(seed)
    return [
        g.normal(size=(n, 3)).astype("float32"),
        g.normal(size=(n, 2)).astype("float32"),
    ]


def test_method_wrapper_function_round_trips(tmp_path):
    """The seed's second example: a top-level function taking `module` first."""
    keras.utils.set_random_seed(0)
    keras_layer = FlaxLayer(module=sm.TwoInputModule(), method=sm.my_flax_module_wrapper)
    in1, in2 = keras.Input((3,)), keras.Input((2,))
    model = keras.Model([in1, in2], keras_layer([in1, in2]))
    model.compile(optimizer="adam", loss="mse")
    xs = _two_inputs()
    y = np.ones((6, 2), "float32")
    model.fit(xs, y, epochs=1, batch_size=3, verbose=0)

    loaded = save_load(model, tmp_path)

    layer = next(lay for lay in loaded.layers if isinstance(lay, FlaxLayer))
    assert layer.method is sm.my_flax_module_wrapper
    assert isinstance(layer.module, sm.TwoInputModule)
    assert_same_model_state(model, loaded, xs)
    # The wrapper still maps `training` to `deterministic`: dropout only in training.
    inference = to_numpy(layer(xs, training=False))
    np.testing.assert_array_equal(inference, to_numpy(layer(xs, training=False)))
    assert not np.array_equal(inference, to_numpy(layer(xs, training=True)))


@pytest.mark.parametrize("how", ["none", "name", "bound", "name-with-training"])
def test_method_forms_round_trip(how, tmp_path):
    keras.utils.set_random_seed(0)
    module = sm.EncoderModule()
    method, out_dim = {
        "none": (None, 3),
        "name": ("encode", 4),
        "bound": (module.encode, 4),
        "name-with-training": ("decode", 3),
    }[how]
    model = keras.Sequential([keras.Input((5,)), FlaxLayer(module, method=method)])
    x, _ = make_data(12, 5, 3)
    expected = model.predict(x, verbose=0)
    assert expected.shape == (12, out_dim)

    loaded = save_load(model, tmp_path)

    layer = loaded.layers[0]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    if how == "none":
        assert layer.method is None
    elif how == "bound":
        assert getattr(layer.method, "__self__", None) is layer.module
        assert layer.method.__func__ is sm.EncoderModule.encode
    else:
        assert layer.method == method
    if how == "name-with-training":
        # `decode` adds 1.0 in training: the method, not __call__, is what runs.
        np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected + 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------- JaxLayer


def test_jax_layer_registered_functions_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), JaxLayer(sm.registered_call, sm.registered_init)])
    model.compile(optimizer="adam", loss="mse")
    x, y = make_data(12, 5, 3)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)

    loaded = save_load(model, tmp_path)

    layer = loaded.layers[0]
    assert layer.call_fn is sm.registered_call
    assert layer.init_fn is sm.registered_init
    assert_same_model_state(model, loaded, x)


def test_jax_layer_registered_stateful_functions_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            JaxLayer(sm.registered_stateful_call, sm.registered_stateful_init),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x, y = make_data(12, 5, 2)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert float(to_numpy(model.layers[0].state["count"])) == 3.0

    loaded = save_load(model, tmp_path)

    np.testing.assert_array_equal(to_numpy(loaded.layers[0].state["count"]), 3.0)
    assert_same_model_state(model, loaded, x)


def test_jax_layer_unregistered_functions_via_custom_objects(tmp_path):
    def local_init(rng, inputs):
        return {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}

    def local_call(params, inputs):
        return jnp.sin(inputs @ params["w"])

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), JaxLayer(local_call, local_init)])
    model.compile(optimizer="adam", loss="mse")
    x, y = make_data(12, 5, 2)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    with pytest.raises(Exception, match=r"local_call|local_init"):
        keras.saving.load_model(path)
    loaded = keras.saving.load_model(
        path, custom_objects={"local_call": local_call, "local_init": local_init}
    )

    assert loaded.layers[0].call_fn is local_call
    assert loaded.layers[0].init_fn is local_init
    assert_same_model_state(model, loaded, x)


def _shapes_in(spec):
    """Every {"shape": ..., "dtype": ...} leaf in a recorded spec, as (shape, dtype)."""
    if isinstance(spec, dict):
        if "shape" in spec:
            return [(tuple(spec["shape"]), spec.get("dtype"))]
        return [s for v in spec.values() for s in _shapes_in(v)]
    if isinstance(spec, list):
        return [s for v in spec for s in _shapes_in(v)]
    return []


def test_jax_layer_given_params_without_init_fn_round_trips(tmp_path):
    g = np.random.default_rng(1)
    params = {
        "kernel": g.normal(size=(5, 3)).astype("float32"),
        "bias": g.normal(size=(3,)).astype("float32"),
    }
    layer = JaxLayer(sm.params_only_call, params=params)
    model = keras.Sequential([keras.Input((5,)), layer])
    x, _ = make_data(12, 5, 3)
    expected = model.predict(x, verbose=0)

    config = layer.get_config()
    json.dumps(config)
    assert config["init_fn"] is None
    assert sorted(_shapes_in(config["params"])) == [((3,), "float32"), ((5, 3), "float32")]

    loaded = save_load(model, tmp_path, custom_objects={"params_only_call": sm.params_only_call})

    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    np.testing.assert_array_equal(to_numpy(loaded.layers[0].params["kernel"]), params["kernel"])
    np.testing.assert_array_equal(to_numpy(loaded.layers[0].params["bias"]), params["bias"])


# --------------------------------------------------- get_config and Keras's (de)serialization


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlaxLayer(sm.MyFlaxModule()),
        lambda: FlaxLayer(sm.BatchNormNet(hidden=6), name="bn"),
        lambda: FlaxLayer(nn.Dense(4, use_bias=False, dtype=jnp.float32)),
        lambda: FlaxLayer(sm.EncoderModule(), method="encode"),
        lambda: FlaxLayer(sm.TwoInputModule(hidden=4), method=sm.my_flax_module_wrapper),
    ],
    ids=["seed", "batchnorm", "flax-dense", "method-name", "method-function"],
)
def test_get_config_is_json(make):
    layer = make()
    config = layer.get_config()
    text = json.dumps(config)
    assert json.loads(text) == json.loads(json.dumps(layer.get_config()))
    clone = FlaxLayer.from_config(json.loads(text))
    assert type(clone.module) is type(layer.module)
    assert clone.module == layer.module
    assert clone.name == layer.name


def _call_all(layer, x):
    return to_numpy(layer(x, training=False))


@pytest.mark.parametrize("built_before", [True, False])
def test_serialize_deserialize_keras_object_round_trip(built_before):
    keras.utils.set_random_seed(0)
    layer = FlaxLayer(sm.BatchNormNet(hidden=6, out=2), name="bn_layer")
    x, _ = make_data(12, 4, 3)
    if built_before:
        layer(x)

    data = keras.saving.serialize_keras_object(layer)
    json.dumps(data)
    clone = keras.saving.deserialize_keras_object(json.loads(json.dumps(data)))

    assert type(clone) is FlaxLayer
    assert type(clone.module) is sm.BatchNormNet
    assert clone.module == layer.module
    assert clone.module.hidden == 6 and clone.module.out == 2
    assert clone.name == "bn_layer"
    assert clone.get_config() == layer.get_config()

    if not built_before:
        layer(x)
    if not clone.built:
        clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(_call_all(clone, x), _call_all(layer, x))


def test_jax_layer_given_params_and_state_without_init_fn_round_trips(tmp_path):
    def given_state_call(params, state, inputs, training):
        new_b = state["b"] + (1.0 if training else 0.0)
        return inputs @ params["w"] + state["b"], {"b": new_b}

    layer = JaxLayer(
        given_state_call,
        params={"w": np.full((5, 2), 0.5, "float32")},
        state={"b": np.full((2,), 0.25, "float32")},
    )
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    x, y = make_data(12, 5, 2)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert float(to_numpy(layer.state["b"])[0]) == 3.25  # 3 training steps

    config = layer.get_config()
    assert sorted(_shapes_in(config["state"])) == [((2,), "float32")]
    loaded = save_load(model, tmp_path, custom_objects={"given_state_call": given_state_call})

    np.testing.assert_array_equal(to_numpy(loaded.layers[0].state["b"]), 3.25)
    assert_same_model_state(model, loaded, x)


def test_flax_layer_given_variables_round_trips(tmp_path):
    """Variables given at construction are not in the config; the weights file holds them."""
    variables = sm.BatchNormNet().init(jax.random.key(3), jnp.ones((1, 5)), False)
    given_kernel = np.array(variables["params"]["Dense_0"]["kernel"])
    layer = FlaxLayer(sm.BatchNormNet(), variables=variables)
    model = keras.Sequential([keras.Input((5,)), layer])
    x, _ = make_data(12, 5, 3)
    expected = model.predict(x, verbose=0)
    assert "variables" not in layer.get_config()

    loaded = save_load(model, tmp_path)

    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    kernel = loaded.layers[0].params["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(to_numpy(kernel), given_kernel)


def test_layer_arguments_round_trip(tmp_path):
    layer = FlaxLayer(sm.BatchNormDropoutNet(rate=0.25), seed=7, trainable=False, name="frozen")
    model = keras.Sequential([keras.Input((5,)), layer])
    loaded = save_load(model, tmp_path).layers[0]
    assert loaded.seed == 7
    assert loaded.trainable is False
    assert loaded.name == "frozen"
    assert loaded.module.rate == 0.25
    assert len(loaded.trainable_variables) == 0


def test_layer_rebuilt_from_config_without_weights_starts_as_a_fresh_build():
    """Every deferred variable gets its own initial value, the state included (BatchNorm's
    mean 0 and var 1, not another variable's values), however Keras first reads them."""
    from core_models import BatchNormModule

    layer = FlaxLayer(BatchNormModule(), name="bn")
    layer.build((None, 3))
    fresh = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    state = {v.path.rsplit("/", 1)[-1]: v for v in fresh.weights if "batch_stats" in v.path}
    if keras.backend.backend() != "torch":  # torch reads hold placeholders until a call
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(state["mean"].value), 0.0)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(state["var"].value), 1.0)
    fresh(np.ones((2, 3), "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(state["mean"]), np.zeros(4))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(state["var"]), np.ones(4))
