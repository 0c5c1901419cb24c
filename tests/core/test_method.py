"""The `method` argument (None, bound method, name, function) and its errors.

Behaviours that hold for Linen and NNX alike are one test parametrized by module kind: a Linen
`EncoderModule` and an NNX `MLP`, both with `encode(inputs)` and `takes_extra(inputs, scale)`.
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core_models import EncoderModule
from flaxlayer import FlaxLayer
from helpers import flax_inference, to_numpy
from nnx_models import MLP

KINDS = {"linen": EncoderModule, "nnx": lambda: MLP(3, 2, rngs=nnx.Rngs(0))}

X = np.arange(6, dtype="float32").reshape(2, 3) / 6.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["name", "bound"])
def test_method_name_or_bound_method(kind, how):
    module = KINDS[kind]()
    layer = FlaxLayer(module, method="encode" if how == "name" else module.encode)
    out = to_numpy(layer(X))
    assert out.shape == ((2, 4) if kind == "linen" else (2, 8))  # encode's, not __call__'s
    np.testing.assert_allclose(out, flax_inference(layer, X, method="encode"), rtol=1e-5, atol=1e-6)
    if kind == "linen":  # only the submodule encode uses was initialized
        assert set(layer.params["params"]) == {"enc"}


@pytest.mark.parametrize("kind", KINDS)
def test_method_function_inputs_argument_may_have_any_name(kind):
    """The first argument after the module receives the inputs, whatever its name."""

    def fn(m, x):
        return m.encode(x)

    layer = FlaxLayer(KINDS[kind](), method=fn)
    np.testing.assert_allclose(
        to_numpy(layer(X)), flax_inference(layer, X, method="encode"), atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["name", "bound", "function"])
def test_method_with_an_extra_argument_raises_at_the_call_unless_a_dict_fills_it(kind, how):
    def with_scale(module, inputs, training, scale):
        return module.takes_extra(inputs, scale)

    def layer_of(module, **kwargs):
        method = {"name": "takes_extra", "bound": module.takes_extra, "function": with_scale}
        return FlaxLayer(module, method=method[how], **kwargs)

    layer = layer_of(KINDS[kind](), name="my_layer")
    with pytest.raises(ValueError, match="`scale`") as info:
        layer(X)
    assert "FlaxLayer 'my_layer'" in str(info.value)
    scale = np.full((2, 1), 3.0, "float32")
    named = layer_of(KINDS[kind]())
    out = to_numpy(named({"inputs": X, "scale": scale}))
    np.testing.assert_allclose(out, 3.0 * to_numpy(named({"inputs": X, "scale": scale / 3})))


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_method_name_raises(kind):
    with pytest.raises(ValueError, match="no_such_method") as info:
        FlaxLayer(KINDS[kind](), method="no_such_method", name="enc_layer")
    message = str(info.value)
    assert "enc_layer" in message
    assert "encode" in message  # lists what is available


def test_method_none_uses_call():
    module = EncoderModule()
    layer = FlaxLayer(module)
    out = to_numpy(layer(X))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, np.asarray(module.apply(layer.flax_variables, X)), rtol=1e-6)


def test_method_name_with_training():
    module = EncoderModule()
    layer = FlaxLayer(module, method="decode")
    x = np.ones((2, 4), "float32")
    inference = to_numpy(layer(x))
    training = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(training - inference, 1.0, rtol=1e-6)


def test_method_plain_function_taking_module():
    def double_encode(module, inputs):
        return module.encode(inputs) * 2.0

    module = EncoderModule()
    layer = FlaxLayer(module, method=double_encode)
    out = to_numpy(layer(X))
    expected = 2.0 * np.asarray(module.apply(layer.flax_variables, X, method="encode"))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_method_function_with_training_any_order():
    def fn(module, training, inputs):
        return module.decode(inputs, training)

    layer = FlaxLayer(EncoderModule(), method=fn)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)) - to_numpy(layer(x)), 1.0, rtol=1e-6
    )


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


def test_method_argument_no_rule_fills_raises_at_the_call_with_the_wrapper_and_dict():
    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x, mask, deterministic=True):
            return nn.Dense(2)(x) * mask

    layer = FlaxLayer(Masked(), name="masked")  # a dict of inputs could fill `mask`
    with pytest.raises(ValueError, match="`mask`") as info:
        layer(np.ones((2, 3), "float32"))
    message = str(info.value)
    assert "call the layer with a dict that names them: {'x': ..., 'mask': ...}" in message
    assert "masked" in message
    assert "def call_masked(module, inputs, training=False):" in message
    assert "x, mask = inputs" in message
    assert "return module(x, mask, deterministic=not training)" in message


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
    assert to_numpy(layer(X, training=True)).shape == (2, 2)
