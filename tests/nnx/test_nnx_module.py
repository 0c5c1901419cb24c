"""NNX modules as FlaxLayers: recognised, `method`, variables and their paths, nnx.State I/O."""

import jax
import keras
import numpy as np
import pytest
from flax import nnx

from flaxlayer import FlaxLayer
from helpers import to_numpy
from nnx_models import (
    MLP,
    BNNet,
    Count,
    ListNet,
    Scale,
    VariableKinds,
    double_encode,
    encode_training,
)
from sample_data import normal_data


def _x(n=8, dim=3, seed=0):
    return normal_data(n, dim, seed)


def _y(n=8, dim=2, seed=1):
    return normal_data(n, dim, seed)


def _var(layer, path):
    matches = [v for v in layer.weights if v.path == path]
    assert len(matches) == 1, (path, [v.path for v in layer.weights])
    return matches[0]


def _twin(make, layer):
    """A fresh NNX module built like the wrapped one, holding the layer's current values."""
    module = make()
    nnx.update(module, layer.flax_variables)
    return module


def _sizes(state):
    return sum(int(np.size(x)) for x in jax.tree.leaves(state))


# -------------------------------------------------------------- recognising NNX modules


def test_nnx_module_is_recognised_without_any_extra_argument():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    x = _x()
    out = to_numpy(layer(x))
    assert out.shape == (8, 2)
    twin = _twin(lambda: MLP(3, 2, rngs=nnx.Rngs(5)), layer)
    twin.eval()
    np.testing.assert_allclose(out, np.asarray(twin(x)), rtol=1e-6, atol=1e-6)


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="flax"):
        FlaxLayer(object())


def test_method_function_taking_module_first():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    kernel = np.asarray(module.linear1.kernel.get_value())
    bias = np.asarray(module.linear1.bias.get_value())
    layer = FlaxLayer(module, method=double_encode)
    x = _x()
    np.testing.assert_allclose(to_numpy(layer(x)), 2.0 * (x @ kernel + bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["name", "bound", "function"])
def test_method_with_training_gets_the_flag(how):
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    method = {
        "name": "encode_with_training",
        "bound": module.encode_with_training,
        "function": encode_training,
    }[how]
    layer = FlaxLayer(module, method=method)
    x = _x()
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)) - to_numpy(layer(x)), 1.0, rtol=1e-5
    )


def test_method_function_whose_first_argument_is_not_module_raises():
    def wrong(inputs, training):
        return inputs

    with pytest.raises(ValueError, match="module"):
        FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)), method=wrong)


# ----------------------------------------------------------------------------- `method`


def test_params_trainable_everything_else_non_trainable():
    module = VariableKinds(3, 2, rngs=nnx.Rngs(0))
    n_params = _sizes(nnx.state(module, nnx.Param))
    n_other = _sizes(nnx.state(module, nnx.Not(nnx.Param)))
    layer = FlaxLayer(module)
    layer(_x())
    trainable = {v.path for v in layer.trainable_weights}
    non_trainable = {v.path for v in layer.non_trainable_weights}
    assert trainable == {
        "flax_layer/linear/kernel",
        "flax_layer/linear/bias",
        "flax_layer/bn/scale",
        "flax_layer/bn/bias",
        "flax_layer/scale",  # an nnx.Param subclass
    }
    assert non_trainable == {
        "flax_layer/bn/mean",
        "flax_layer/bn/var",
        "flax_layer/calls",  # a user Variable type
        "flax_layer/last_mean",  # nnx.Cache
    }
    assert layer.count_params() == n_params + n_other
    assert sum(int(np.prod(v.shape)) for v in layer.trainable_weights) == n_params
    assert sum(int(np.prod(v.shape)) for v in layer.non_trainable_weights) == n_other


def test_param_count_equals_the_modules_own():
    module = MLP(3, 2, hidden=16, rngs=nnx.Rngs(0))
    n_params = _sizes(nnx.state(module, nnx.Param))
    n_stats = _sizes(nnx.state(module, nnx.BatchStat))
    layer = FlaxLayer(module)
    layer.build((None, 3))
    assert sum(int(np.prod(v.shape)) for v in layer.trainable_weights) == n_params
    assert sum(int(np.prod(v.shape)) for v in layer.non_trainable_weights) == n_stats
    # The rng state is no Keras variable of the layer's own weights.
    assert all("rngs" not in v.path for v in layer.weights)


def test_non_param_variables_are_written_back_after_each_call():
    module = VariableKinds(3, 2, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    x = _x()
    for _ in range(3):
        layer(x)
    assert int(to_numpy(_var(layer, "flax_layer/calls"))) == 3
    np.testing.assert_allclose(to_numpy(_var(layer, "flax_layer/last_mean")), x.mean(), rtol=1e-5)
    x2 = x + 1.0
    layer(x2, training=True)
    assert int(to_numpy(_var(layer, "flax_layer/calls"))) == 4
    np.testing.assert_allclose(to_numpy(_var(layer, "flax_layer/last_mean")), x2.mean(), rtol=1e-5)


def test_batch_stats_change_and_params_train_in_fit():
    module = VariableKinds(3, 2, rngs=nnx.Rngs(0))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    model.fit(_x(16), _y(16), epochs=2, batch_size=8, verbose=0)
    after = {v.path: to_numpy(v) for v in model.weights}
    prefix = "sequential/flax_layer/"
    for name in ("bn/mean", "bn/var", "linear/kernel", "scale"):
        assert not np.allclose(before[prefix + name], after[prefix + name]), name
    assert int(after[prefix + "calls"]) == 4  # 2 epochs x 2 steps


def test_module_arrays_are_moved_not_copied():
    if keras.backend.backend() != "jax":
        pytest.skip("variables share JAX buffers on the JAX backend; others hold their own tensors")
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    expected = {
        "/".join(str(k) for k in path): var.get_value()
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))
    }
    layer = FlaxLayer(module)
    layer.build((None, 3))
    assert len(layer.weights) == len(expected)
    for name, array in expected.items():
        value = _var(layer, f"flax_layer/{name}").value
        assert value is array or (value.unsafe_buffer_pointer() == array.unsafe_buffer_pointer()), (
            name
        )


def test_module_used_after_its_arrays_moved_says_where_they_went():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module, name="mlp")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(_x(16), _y(16), epochs=1, batch_size=8, verbose=0)
    with pytest.raises(RuntimeError) as caught:
        module(_x())
    message = str(caught.value)
    assert "FlaxLayer 'mlp'" in message
    assert "module = layer.module" in message
    assert "nnx.update(module, layer.flax_variables)" in message
    assert "deleted" not in message  # not JAX's donated-buffer error
    # Reading a value as an array is refused the same way; shape and dtype stay readable.
    with pytest.raises(RuntimeError, match="FlaxLayer 'mlp'"):
        np.asarray(module.linear1.kernel[...])
    assert module.linear1.kernel.get_value().shape == (3, 8)
    # The documented way back works, and the module runs again.
    nnx.update(module, model.layers[0].flax_variables)
    module.eval()
    np.testing.assert_allclose(np.asarray(module(_x())), model.predict(_x(), verbose=0), atol=1e-5)


def test_wrapping_a_module_whose_arrays_moved_is_refused_at_construction():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    FlaxLayer(module, name="first").build((None, 3))
    with pytest.raises(ValueError, match=r"FlaxLayer 'second'.*FlaxLayer 'first'"):
        FlaxLayer(module, name="second")


def test_module_given_variables_keeps_its_own_arrays():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module, variables=nnx.state(MLP(3, 2, rngs=nnx.Rngs(1))))
    layer(_x())
    module.eval()
    assert np.asarray(module(_x())).shape == (8, 2)  # the layer took nothing from it


# ------------------------------------------------------------------ variables and paths


def test_variable_paths_are_layer_name_and_attribute_path():
    mlp = FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))
    mlp.build((None, 3))
    assert {v.path for v in mlp.weights} == {
        "flax_layer/linear1/kernel",
        "flax_layer/linear1/bias",
        "flax_layer/bn/scale",
        "flax_layer/bn/bias",
        "flax_layer/bn/mean",
        "flax_layer/bn/var",
        "flax_layer/linear2/kernel",
        "flax_layer/linear2/bias",
    }
    listed = FlaxLayer(ListNet(3, 2, rngs=nnx.Rngs(0)), name="listed")
    listed.build((None, 3))
    assert {v.path for v in listed.weights} == {
        "listed/layers/0/kernel",
        "listed/layers/0/bias",
        "listed/layers/1/kernel",
        "listed/layers/1/bias",
    }


# --------------------------------------------------------- nnx.State inputs and outputs


def test_flax_variables_is_an_nnx_state_with_current_values():
    module = VariableKinds(3, 2, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    layer(_x())
    layer(_x())
    state = layer.flax_variables
    assert isinstance(state, nnx.State)
    np.testing.assert_array_equal(
        np.asarray(state["linear"]["kernel"].get_value()),
        to_numpy(_var(layer, "flax_layer/linear/kernel")),
    )
    assert int(state["calls"].get_value()) == 2
    assert isinstance(state["calls"], Count)
    assert isinstance(state["scale"], Scale)


def test_nnx_update_brings_trained_values_back_to_a_pure_module():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer="adam", loss="mse")
    x, y = _x(16), _y(16)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    predicted = model.predict(x, verbose=0)
    nnx.update(module, model.layers[0].flax_variables)
    module.eval()
    np.testing.assert_allclose(np.asarray(module(x)), predicted, atol=1e-5)


def test_variables_accepts_an_nnx_state_to_start_from():
    other = MLP(3, 2, rngs=nnx.Rngs(7))
    # Change the other module's batch stats too, so they must come from the State as well.
    other(_x(seed=3))
    layer = FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)), variables=nnx.state(other))
    x = _x()
    out = to_numpy(layer(x))
    other.eval()
    np.testing.assert_allclose(out, np.asarray(other(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        to_numpy(_var(layer, "flax_layer/bn/mean")), np.asarray(other.bn.mean.get_value())
    )


def test_variables_state_with_other_shapes_raises_naming_the_path():
    bigger = MLP(3, 2, hidden=16, rngs=nnx.Rngs(1))
    layer = FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)), variables=nnx.state(bigger))
    with pytest.raises(ValueError, match="linear1/kernel"):
        layer(_x())


def test_variables_state_from_another_module_kind_raises():
    layer = FlaxLayer(
        MLP(3, 2, rngs=nnx.Rngs(0)), variables=nnx.state(BNNet(3, 2, rngs=nnx.Rngs(0)))
    )
    with pytest.raises(ValueError, match="linear1"):
        layer(_x())
