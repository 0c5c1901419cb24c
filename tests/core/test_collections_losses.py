"""Collections sown per call never break calls; "losses" feed add_loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from core_models import ConstantLossModule, SowModule
from flaxlayer import FlaxLayer
from helpers import to_numpy
from sample_data import make_data


def test_sown_collections_do_not_break_call_jit_or_fit():
    module = SowModule()
    x, y = make_data(n=16)
    layer = FlaxLayer(module)
    out = to_numpy(layer(x))
    expected = np.asarray(module.apply(layer.flax_variables, x, False))
    # On TensorFlow and PyTorch another compiler (or JAX's jit, not op by op) runs the module:
    # the last float bit may differ.
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # Sown collections are per-call outputs, not state.
    assert set(layer.state) == set()
    assert all("/params/" in w.path for w in layer.weights)
    to_numpy(layer(x, training=True))

    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(x, verbose=0).shape == (16, 2)
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_sown_collections_under_outer_jit():
    if keras.backend.backend() != "jax":
        pytest.skip("an outer jax.jit over stateless_call needs JAX-backend variables")
    layer = FlaxLayer(SowModule())
    x = make_data(n=4)[0]
    layer(x)
    params = [v.value for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def f(values, other_values, inputs):
        out, _ = layer.stateless_call(values, other_values, inputs)
        return out

    np.testing.assert_allclose(np.asarray(f(params, others, x)), to_numpy(layer(x)), rtol=1e-6)


def test_sown_losses_are_summed_into_model_losses():
    layer = FlaxLayer(ConstantLossModule())
    x = np.ones((4, 3), "float32")
    out = to_numpy(layer(x))
    np.testing.assert_allclose(out, 0.0)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(to_numpy(layer.losses[0]), 5.0)


def test_sown_losses_in_evaluate_and_fit():
    x = np.ones((8, 3), "float32")
    zeros = np.zeros((8, 2), "float32")
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(ConstantLossModule())])
    model.compile(optimizer="sgd", loss="mse")
    np.testing.assert_allclose(model.evaluate(x, zeros, verbose=0), 5.0, rtol=1e-6)
    history = model.fit(x, zeros, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], 5.0, rtol=1e-6)


def test_losses_sown_only_in_training():
    x = np.ones((8, 3), "float32")
    zeros = np.zeros((8, 2), "float32")
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(ConstantLossModule(training_only=True))])
    model.compile(optimizer="sgd", loss="mse")
    np.testing.assert_allclose(model.evaluate(x, zeros, verbose=0), 0.0, atol=1e-7)
    history = model.fit(x, zeros, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], 5.0, rtol=1e-6)


def test_sown_loss_gradients_reach_params():
    class L2Sow(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            dense = nn.Dense(2, use_bias=False, kernel_init=nn.initializers.ones)
            out = dense(inputs) * 0.0  # the data loss gives no gradient at all
            self.sow("losses", "l2", jnp.sum(dense.variables["params"]["kernel"] ** 2))
            return out

    x = np.ones((8, 3), "float32")
    layer = FlaxLayer(L2Sow())
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.zeros((8, 2), "float32"), epochs=2, batch_size=8, verbose=0)
    kernel = to_numpy(layer.params["params"]["Dense_0"]["kernel"])
    # Each SGD step on sum(k^2) with lr 0.1 multiplies the kernel by 0.8.
    np.testing.assert_allclose(kernel, 0.64, rtol=1e-5)
