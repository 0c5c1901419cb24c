"""Parity with keras.layers.JaxLayer / FlaxLayer: every behaviour Keras tests for them.

Every behaviour that Keras's own test file for these layers checks
(keras-team/keras, keras/src/utils/jax_layer_test.py) is checked here for flaxlayer's JaxLayer
and FlaxLayer, written anew with tiny shapes. Keras runs that file on JAX and TensorFlow only;
this one runs on every backend, and skips a test only where the behaviour cannot apply (each
skip says why).

The first part follows one layer through a model's life, for each of Keras's nine layer
configurations: a functional model and its weight counts, `fit` (which must change every
trainable and non-trainable weight), inference (which must change none), the trained values
exported through `layer.params` / `layer.state` into a new layer in a Sequential model built
with `input_shape=`, `.keras` save and load, `model.export(format="tf_saved_model")`, and a
subclassed model without a build method. The layer of each configuration is trained once
(cached) and each behaviour is its own test.
"""

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from flaxlayer import FlaxLayer, JaxLayer
from helpers import to_numpy

BACKEND = keras.backend.backend()
NUM_CLASSES = 4
INPUT_SHAPE = (8, 8, 1)  # excluding the batch dimension
MIXED = "mixed_float16"

# ------------------------------------------------------------------ the functions and modules


@keras.saving.register_keras_serializable(package="parity")
def stateless_fn(inputs):
    x = jnp.sum(inputs, axis=(1, 2, 3))
    return jnp.tile(jnp.expand_dims(x, axis=1), (1, NUM_CLASSES))


@keras.saving.register_keras_serializable(package="parity")
def mlp_init(rng, inputs):
    sizes = [math.prod(INPUT_SHAPE), 8, NUM_CLASSES]
    params = []
    for m, n in itertools.pairwise(sizes):
        rng, w_rng, b_rng = jax.random.split(rng, 3)
        params.append(
            [
                jax.nn.initializers.glorot_normal()(w_rng, (m, n)),
                jax.nn.initializers.normal(0.1)(b_rng, (n,)),
            ]
        )
    return params


@keras.saving.register_keras_serializable(package="parity")
def mlp_apply(params, inputs):
    x = inputs.reshape((inputs.shape[0], -1))
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return jax.nn.softmax(x @ w + b, axis=-1)


@keras.saving.register_keras_serializable(package="parity")
def counter_init(rng, inputs, training):
    return mlp_init(rng, inputs), jnp.zeros([], jnp.float32)


@keras.saving.register_keras_serializable(package="parity")
def counter_apply(params, state, inputs, training):
    outputs = mlp_apply(params, inputs)
    if training:
        state = state + 1
    return outputs, state


def _flatten(x):
    return x.reshape((x.shape[0], -1))


class IndependentNet(nn.Module):
    """No training flag, no rng; called through the method `forward`."""

    @nn.compact
    def forward(self, inputs):
        x = nn.relu(nn.Dense(16)(_flatten(inputs)))
        x = nn.relu(nn.Dense(8)(x))
        return nn.softmax(nn.Dense(NUM_CLASSES)(x))


class DropoutNet(nn.Module):
    """Dropout (an rng per training call), called through `dropout_wrapper`."""

    @nn.compact
    def my_apply(self, inputs, training):
        x = nn.relu(nn.Dense(16)(_flatten(inputs)))
        x = nn.Dense(8)(x)
        x = nn.relu(nn.Dropout(rate=0.3, deterministic=not training)(x))
        return nn.softmax(nn.Dense(NUM_CLASSES)(x))


@keras.saving.register_keras_serializable(package="parity")
def dropout_wrapper(module, x, training):
    """A method function whose inputs argument is named `x`, not `inputs`."""
    return module.my_apply(x, training)


class BatchNormNet(nn.Module):
    """BatchNorm statistics (non-trainable state), dropout, `training=False` by default."""

    @nn.compact
    def __call__(self, inputs, training=False):
        ura = not training
        x = nn.Dense(16, use_bias=False)(_flatten(inputs))
        x = nn.relu(nn.BatchNorm(use_running_average=ura, use_scale=False)(x))
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=ura, use_scale=False)(x)
        x = nn.relu(nn.Dropout(rate=0.3, deterministic=not training)(x))
        return nn.softmax(nn.Dense(NUM_CLASSES)(x))


# --------------------------------------------------------------------- the nine configurations


def _jax_layer(call_fn, init_fn, **fixed):
    def make(**kwargs):
        return JaxLayer(call_fn=call_fn, init_fn=init_fn, **fixed, **kwargs)

    return make


def _flax_layer(module_class, *, bound_method=None, **fixed):
    """Keras's FlaxLayer factory: exported `params`/`state` become one `variables` dict."""

    def make(params=None, state=None, **kwargs):
        variables = {**(params or {}), **(state or {})} or None
        kwargs = {**fixed, **kwargs}
        if bound_method is not None:
            # A bound method of *another* instance of the module's class.
            kwargs["method"] = getattr(module_class(), bound_method)
        return FlaxLayer(module_class(), variables=variables, **kwargs)

    return make


@dataclasses.dataclass(frozen=True)
class Case:
    make: object
    trainable_weights: int
    trainable_params: int
    non_trainable_weights: int
    non_trainable_params: int
    mixed: bool = False


MLP_PARAMS = 64 * 8 + 8 + 8 * NUM_CLASSES + NUM_CLASSES  # 556
DENSE_PARAMS = (64 * 16 + 16) + (16 * 8 + 8) + (8 * NUM_CLASSES + NUM_CLASSES)  # 1212
BN_PARAMS = 64 * 16 + 16 + (16 * 8 + 8) + 8 + (8 * NUM_CLASSES + NUM_CLASSES)  # 1220

CASES = {
    "jax_stateless": Case(_jax_layer(stateless_fn, None), 0, 0, 0, 0),
    "jax_training_independent": Case(_jax_layer(mlp_apply, mlp_init), 4, MLP_PARAMS, 0, 0),
    "jax_training_state": Case(_jax_layer(counter_apply, counter_init), 4, MLP_PARAMS, 1, 1),
    "jax_training_state_mixed_float16": Case(
        _jax_layer(counter_apply, counter_init, dtype=keras.DTypePolicy(MIXED)),
        4,
        MLP_PARAMS,
        1,
        1,
        mixed=True,
    ),
    "jax_native_serialization_platforms": Case(
        _jax_layer(mlp_apply, mlp_init, native_serialization_platforms=("cpu", "tpu")),
        4,
        MLP_PARAMS,
        0,
        0,
    ),
    "flax_bound_method_of_another_instance": Case(
        _flax_layer(IndependentNet, bound_method="forward"), 6, DENSE_PARAMS, 0, 0
    ),
    "flax_method_function_x_training": Case(
        _flax_layer(DropoutNet, method=dropout_wrapper), 6, DENSE_PARAMS, 0, 0
    ),
    "flax_batchnorm_call_training_default": Case(_flax_layer(BatchNormNet), 7, BN_PARAMS, 4, 48),
    "flax_method_function_mixed_float16": Case(
        _flax_layer(DropoutNet, method=dropout_wrapper, dtype=keras.DTypePolicy(MIXED)),
        6,
        DENSE_PARAMS,
        0,
        0,
        mixed=True,
    ),
}
CASE_IDS = sorted(CASES)


def _values(weights) -> list[np.ndarray]:
    return [to_numpy(w).copy() for w in weights]


def _count(weights) -> int:
    return sum(math.prod(tuple(w.shape)) for w in weights)


def _counts(layer) -> tuple[int, int, int, int]:
    return (
        len(layer.trainable_weights),
        _count(layer.trainable_weights),
        len(layer.non_trainable_weights),
        _count(layer.non_trainable_weights),
    )


def _expected_counts(case: Case) -> tuple[int, int, int, int]:
    return (
        case.trainable_weights,
        case.trainable_params,
        case.non_trainable_weights,
        case.non_trainable_params,
    )


def _close(a, b, case: Case):
    tol = 2e-3 if case.mixed else 1e-5
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)


def _data():
    g = np.random.default_rng(0)
    x_train = g.uniform(size=(32, *INPUT_SHAPE)).astype("float32")
    y_train = np.eye(NUM_CLASSES, dtype="float32")[g.integers(0, NUM_CLASSES, size=32)]
    x_test = g.uniform(size=(8, *INPUT_SHAPE)).astype("float32")
    return x_train, y_train, x_test


def _compile(model):
    model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])


@dataclasses.dataclass
class Trained:
    """One configuration's layer, followed through a functional model's fit and inference."""

    layer: object
    model: object
    x_test: np.ndarray
    counts: tuple
    before_fit: tuple
    after_fit: tuple
    after_inference: tuple
    output: np.ndarray
    predicted: np.ndarray


@functools.cache
def _trained(name: str) -> Trained:
    case = CASES[name]
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test = _data()
    layer = case.make()
    inputs = keras.Input(INPUT_SHAPE)
    model = keras.Model(inputs, layer(inputs), name=f"{name}_1")
    model.summary(print_fn=lambda *a, **k: None)
    counts = _counts(layer)
    _compile(model)
    before = (_values(layer.trainable_weights), _values(layer.non_trainable_weights))
    model.fit(x_train, y_train, epochs=1, batch_size=16, verbose=0)
    after_fit = (_values(layer.trainable_weights), _values(layer.non_trainable_weights))
    output = to_numpy(model(x_test))
    predicted = model.predict(x_test, verbose=0)
    after_inference = (_values(layer.trainable_weights), _values(layer.non_trainable_weights))
    return Trained(
        layer, model, x_test, counts, before, after_fit, after_inference, output, predicted
    )


@functools.cache
def _rebuilt(name: str):
    """The trained values, exported as NumPy trees, given to a new layer in a Sequential."""
    case, trained = CASES[name], _trained(name)
    params = jax.tree_util.tree_map(to_numpy, trained.layer.params)
    state = trained.layer.state
    state = None if state is None else jax.tree_util.tree_map(to_numpy, state)
    layer = case.make(params=params, state=state, input_shape=INPUT_SHAPE)
    model = keras.Sequential([layer], name=f"{name}_2")
    model.summary(print_fn=lambda *a, **k: None)
    _compile(model)
    return layer, model


def _same_predictions(model, name: str):
    case, trained = CASES[name], _trained(name)
    _close(model(trained.x_test), trained.output, case)
    _close(model.predict(trained.x_test, verbose=0), trained.predicted, case)


@pytest.mark.parametrize("name", CASE_IDS)
def test_functional_model_weight_counts(name):
    assert _trained(name).counts == _expected_counts(CASES[name])


@pytest.mark.parametrize("name", CASE_IDS)
def test_fit_changes_trainable_and_non_trainable_weights(name):
    trained = _trained(name)
    for kind, before, after in zip(
        ("trainable", "non-trainable"), trained.before_fit, trained.after_fit, strict=True
    ):
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            assert not np.allclose(b, a), f"{kind} weight {i} unchanged by fit"


@pytest.mark.parametrize("name", CASE_IDS)
def test_inference_changes_no_weight(name):
    trained = _trained(name)
    assert trained.output.shape == (8, NUM_CLASSES)
    assert trained.predicted.shape == (8, NUM_CLASSES)
    for before, after in zip(trained.after_fit, trained.after_inference, strict=True):
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", CASE_IDS)
def test_exported_values_into_new_layer_in_sequential(name):
    layer, model = _rebuilt(name)
    assert _counts(layer) == _expected_counts(CASES[name])
    _same_predictions(model, name)


@pytest.mark.parametrize("name", CASE_IDS)
def test_keras_file_save_and_load(name, tmp_path):
    _, model = _rebuilt(name)
    path = str(tmp_path / "jax_layer_model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded.summary(print_fn=lambda *a, **k: None)
    assert _counts(loaded.layers[0]) == _expected_counts(CASES[name])
    _same_predictions(loaded, name)


@pytest.mark.parametrize("name", CASE_IDS)
def test_export_tf_saved_model_and_reload(name, tmp_path):
    if BACKEND == "torch":
        pytest.skip("on torch, Keras exports through torch.export, which cannot trace JAX")
    tf = pytest.importorskip("tensorflow")
    _, model = _rebuilt(name)
    path = str(tmp_path / "jax_layer_export")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    trained = _trained(name)
    served = reloaded.serve(tf.constant(trained.x_test)).numpy()
    np.testing.assert_allclose(served, trained.output, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("name", CASE_IDS)
def test_subclassed_model_without_build_method(name):
    class Wrapper(keras.Model):
        def __init__(self, layer):
            super().__init__()
            self._layer = layer

        def call(self, inputs):
            return self._layer(inputs)

    model = Wrapper(CASES[name].make())
    output = to_numpy(model(_data()[2]))
    assert output.shape == (8, NUM_CLASSES)
    assert not np.allclose(output, 0.0)


# --------------------------------------------------------------- function arguments, errors


def test_call_fn_params_without_init_fn_or_values_is_refused():
    def jax_fn(params, inputs):
        return inputs

    with pytest.raises(ValueError):
        JaxLayer(jax_fn)


def test_training_in_call_fn_but_not_in_init_fn():
    def call_fn(params, state, rng, inputs, training):
        return inputs, {}

    def init_fn(rng, inputs):
        return {}, {}

    layer = JaxLayer(call_fn, init_fn)
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))


def test_arguments_in_any_order():
    def call_fn(training, inputs, rng, state, params):
        return inputs, {}

    def init_fn(training, inputs, rng):
        return {}, {}

    layer = JaxLayer(call_fn, init_fn)
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))


def test_call_fn_alone_makes_a_working_layer():
    def call_fn(inputs):
        return inputs

    def init_fn(inputs):
        return {}

    layer = JaxLayer(call_fn, init_fn)
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))


def test_missing_inputs_in_call_fn():
    def call_fn(params, rng, training):
        return jnp.ones((1,))

    def init_fn(rng, inputs):
        return {}

    with pytest.raises(ValueError, match=r"`call_fn`.*`inputs`"):
        JaxLayer(call_fn, init_fn)


def test_missing_inputs_in_init_fn():
    def call_fn(params, rng, inputs, training):
        return jnp.ones((1,))

    def init_fn(rng, training):
        return {}

    with pytest.raises(ValueError, match=r"`init_fn`.*`inputs`"):
        JaxLayer(call_fn, init_fn)


def test_unsupported_argument_in_call_fn():
    def call_fn(params, rng, inputs, mode):
        return jnp.ones((1,))

    def init_fn(rng, inputs):
        return {}

    with pytest.raises(ValueError, match=r"`call_fn`.*`mode`"):
        JaxLayer(call_fn, init_fn)


def test_unsupported_argument_in_init_fn():
    def call_fn(params, rng, inputs, training):
        return inputs

    def init_fn(rng, inputs, mode):
        return {}

    with pytest.raises(ValueError, match=r"`init_fn`.*`mode`"):
        JaxLayer(call_fn, init_fn)


# ------------------------------------------------------------------- structures and shapes


def test_dict_inputs_with_unknown_dims_and_tuple_outputs():
    def jax_fn(params, inputs):
        a, b = inputs["a"], inputs["b"]
        return jnp.concatenate([a, b], axis=1), jnp.concatenate([b, a], axis=1)

    layer = JaxLayer(jax_fn, params={})
    inputs = {"a": keras.Input((None, 3)), "b": keras.Input((None, 3))}
    model = keras.Model(inputs, layer(inputs))
    first, second = model({"a": np.ones((2, 6, 3)), "b": np.ones((2, 7, 3))})
    np.testing.assert_allclose(to_numpy(first), np.ones((2, 13, 3)))
    np.testing.assert_allclose(to_numpy(second), np.ones((2, 13, 3)))


def test_sixty_inputs_with_polymorphic_shapes():
    """More unknown dimensions than letters in the alphabet (each gets its own symbol)."""

    def jax_fn(params, inputs):
        return jnp.concatenate(inputs, axis=1)

    layer = JaxLayer(jax_fn, params=())
    inputs = [keras.Input((None, 3)) for _ in range(60)]
    model = keras.Model(inputs, layer(inputs))
    output = model([np.ones((2, 1, 3))] * 60)
    np.testing.assert_allclose(to_numpy(output), np.ones((2, 60, 3)))


# -------------------------------------------------------------------------- params and state


def test_flax_state_without_params():
    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x):
            count = self.variable("a", "b", lambda shape: jnp.zeros(shape, jnp.int32), [])
            count.value = count.value + 1
            return x

    layer = FlaxLayer(Counter(), variables={"a": {"b": 0}})
    layer(np.ones((1,)))
    assert len(layer.params) == 0
    assert to_numpy(layer.state["a"]["b"].value) == 1


def _identity_with_state(params, state, inputs):
    return inputs, state


def test_state_with_none_leaves():
    layer = JaxLayer(_identity_with_state, state={"foo": None})
    assert layer.state["foo"] is None  # before any call, as in Keras
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))
    assert layer.state["foo"] is None


def test_state_with_string_leaves():
    layer = JaxLayer(_identity_with_state, state={"foo": "bar"})
    assert layer.state["foo"] == "bar"  # before any call, as in Keras


def test_state_with_string_leaves_passes_them_through():
    """Beyond Keras (whose jax2tf path cannot take strings): the layer is callable."""
    seen = []

    def jax_fn(params, state, inputs):
        seen.append(state["foo"])
        return inputs, state

    layer = JaxLayer(jax_fn, state={"foo": "bar", "n": np.zeros(())})
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))
    assert set(seen) == {"bar"}
    assert layer.state["foo"] == "bar"


@jax.tree_util.register_pytree_node_class
class NamedPoint:
    def __init__(self, x, y, name):
        self.x, self.y, self.name = x, y, name

    def tree_flatten(self):
        return (self.x, self.y), self.name

    @classmethod
    def tree_unflatten(cls, name, children):
        return cls(*children, name)


def test_state_with_registered_pytree_node_class():
    layer = JaxLayer(_identity_with_state, state=[NamedPoint(1.0, 2.0, "foo")])
    np.testing.assert_array_equal(to_numpy(layer(np.ones((1,)))), np.ones((1,)))


@pytest.mark.parametrize(
    "init_state",
    [
        [0.0],
        {"state": {"foo": 0.0}},
        {"state": [[0.0]]},
        None,
        {"state": {}},
        {"state": {"foo": [2.0]}},
    ],
    ids=[
        "sequence_instead_of_mapping",
        "mapping_instead_of_sequence",
        "sequence_instead_of_variable",
        "no_initial_state",
        "missing_dict_key",
        "missing_variable_in_list",
    ],
)
def test_state_structure_mismatch_during_update(init_state):
    def jax_fn(params, state, inputs):
        return inputs, {"state": [jnp.ones([])]}

    layer = JaxLayer(jax_fn, params={}, state=init_state)  # constructing is fine
    with pytest.raises(ValueError):
        layer(np.ones((1,)))


def test_no_seed_variable_without_rng():
    """A layer that takes no rng has no non-trainable variable for a seed."""
    layer = JaxLayer(mlp_apply, mlp_init)
    layer.build((None, *INPUT_SHAPE))
    assert layer.non_trainable_weights == []
    assert layer.non_trainable_variables == []


# ------------------------------------------------------------------------------------ rng


def test_rng_seeding_is_reproducible():
    def jax_init(rng, inputs):
        return [jax.nn.initializers.normal(1.0)(rng, inputs.shape)]

    def jax_apply(params, inputs):
        return jnp.dot(inputs, params[0])

    keras.utils.set_random_seed(0)
    layer1 = JaxLayer(jax_apply, jax_init)
    layer1.build((2, 2))
    keras.utils.set_random_seed(0)
    layer2 = JaxLayer(jax_apply, jax_init)
    layer2.build((2, 2))
    np.testing.assert_allclose(to_numpy(layer1.params[0]), to_numpy(layer2.params[0]))


# ------------------------------------------------------------------------ backend specifics


def test_native_serialization_platforms_accepted_and_used():
    """Keras's JaxLayer takes `native_serialization_platforms`; a layer lowered for the CPU
    and a TPU still runs here on the CPU."""
    layer = JaxLayer(mlp_apply, mlp_init, native_serialization_platforms=("cpu", "tpu"))
    x = _data()[2]
    output = to_numpy(layer(x))
    values = jax.tree_util.tree_map(lambda v: jnp.asarray(to_numpy(v)), layer.params)
    np.testing.assert_allclose(output, np.asarray(mlp_apply(values, x)), rtol=1e-5, atol=1e-6)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def call(inputs):
            return layer(inputs)

        graph = call.get_concrete_function(tf.TensorSpec((None, *INPUT_SHAPE))).graph
        platforms = [
            list(op.get_attr("platforms"))
            for op in graph.get_operations()
            if op.type == "XlaCallModule"
        ]
        assert platforms and all(p == [b"CPU", b"TPU"] for p in platforms), platforms
