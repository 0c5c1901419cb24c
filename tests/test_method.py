"""Point 2: the `method` argument (None, bound method, name, function) and its errors."""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from conftest import to_numpy
from flaxlayer import FlaxLayer
from models import EncoderModule

X = np.arange(6, dtype="float32").reshape(2, 3) / 6.0


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_method_none_uses_call():
    module = EncoderModule()
    layer = FlaxLayer(module)
    out = _np(layer(X))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, np.asarray(module.apply(layer.flax_variables, X)), rtol=1e-6)


@pytest.mark.parametrize("how", ["name", "bound"])
def test_method_name_or_bound_method(how):
    module = EncoderModule()
    method = "encode" if how == "name" else module.encode
    layer = FlaxLayer(module, method=method)
    out = _np(layer(X))
    assert out.shape == (2, 4)  # encode's output, not __call__'s (2, 3)
    expected = module.apply(layer.flax_variables, X, method="encode")
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-6)
    # Only the submodule encode uses was initialized.
    assert set(layer.params["params"]) == {"enc"}


def test_method_name_with_training():
    module = EncoderModule()
    layer = FlaxLayer(module, method="decode")
    x = np.ones((2, 4), "float32")
    inference = _np(layer(x))
    training = _np(layer(x, training=True))
    np.testing.assert_allclose(training - inference, 1.0, rtol=1e-6)


def test_method_plain_function_taking_module():
    def double_encode(module, inputs):
        return module.encode(inputs) * 2.0

    module = EncoderModule()
    layer = FlaxLayer(module, method=double_encode)
    out = _np(layer(X))
    expected = 2.0 * np.asarray(module.apply(layer.flax_variables, X, method="encode"))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_method_function_with_training_any_order():
    def fn(module, training, inputs):
        return module.decode(inputs, training)

    layer = FlaxLayer(EncoderModule(), method=fn)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(_np(layer(x, training=True)) - _np(layer(x)), 1.0, rtol=1e-6)


def test_method_extra_argument_of_module_method_raises():
    with pytest.raises(ValueError, match="scale") as info:
        FlaxLayer(EncoderModule(), method="takes_extra", name="my_layer")
    assert "my_layer" in str(info.value)


def test_method_extra_argument_of_bound_method_raises():
    module = EncoderModule()
    with pytest.raises(ValueError, match="scale"):
        FlaxLayer(module, method=module.takes_extra)


def test_method_function_extra_argument_raises():
    def fn(module, inputs, training, extra):
        return module.encode(inputs)

    with pytest.raises(ValueError, match="extra") as info:
        FlaxLayer(EncoderModule(), method=fn, name="named_layer")
    assert "named_layer" in str(info.value)


def test_method_function_inputs_argument_may_have_any_name():
    """The first argument after the module receives the inputs, whatever its name."""

    def fn(m, x):
        return m.encode(x)

    layer = FlaxLayer(EncoderModule(), method=fn)
    x = np.ones((2, 3), "float32")
    out = layer(x)
    expected = EncoderModule().apply(layer.flax_variables, x, method=EncoderModule.encode)
    np.testing.assert_allclose(to_numpy(out), np.asarray(expected), atol=1e-6)


def test_call_with_x_and_train_arguments():
    class RealCall(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            return nn.Dense(2)(x) + (1.0 if train else 0.0)

    layer = FlaxLayer(RealCall())
    x = np.ones((2, 3), "float32")
    inference = to_numpy(layer(x))
    training = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(training - inference, np.ones((2, 2)), atol=1e-6)


def test_method_with_an_unfillable_argument_raises_with_the_wrapper_to_write():
    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x, mask, deterministic=True):
            return nn.Dense(2)(x) * mask

    with pytest.raises(ValueError, match="`mask`") as info:
        FlaxLayer(Masked(), name="masked")
    message = str(info.value)
    assert "masked" in message
    assert "def call_masked(module, inputs, training=False):" in message
    assert "x, mask = inputs" in message
    assert "return module(x, mask, deterministic=not training)" in message


def test_unknown_method_name_raises():
    with pytest.raises(ValueError, match="no_such_method") as info:
        FlaxLayer(EncoderModule(), method="no_such_method", name="enc_layer")
    message = str(info.value)
    assert "enc_layer" in message
    assert "encode" in message  # lists what is available


def test_a_dataclass_field_holding_a_function_is_not_a_method():
    # nn.Dense's `kernel_init` is a function-valued field, not a method to call.
    with pytest.raises(ValueError, match="defines no method of that name") as info:
        FlaxLayer(nn.Dense(2), method="kernel_init")
    assert "Its methods: __call__." in str(info.value)


def test_default_layer_name_in_error():
    with pytest.raises(ValueError, match="FlaxLayer 'flax_layer'"):
        FlaxLayer(EncoderModule(), method="no_such_method")


def test_module_must_be_a_linen_module():
    with pytest.raises((TypeError, ValueError), match="JaxLayer"):
        FlaxLayer(lambda inputs: inputs)


def test_call_taking_training_gets_it_call_without_does_not():
    class NoTraining(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            return nn.Dense(2)(inputs) + jnp.float32(0.0)

    layer = FlaxLayer(NoTraining())
    assert _np(layer(X, training=True)).shape == (2, 2)
