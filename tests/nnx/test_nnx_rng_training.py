"""NNX modules: rng state held inside the module, and the training mode.

What Linen and NNX share (dropout keys per call and per step, seeds, `training` in each Keras
entry point) is parametrized by module kind in test_rng.py and test_training_flag.py.
"""

import keras
import numpy as np
from flax import nnx

from flaxlayer import FlaxLayer
from helpers import to_numpy, weight_named
from nnx_models import MLP, BNNet, NoiseNet
from sample_data import normal_data

# ---------------------------------------------------------- rng state inside the module


def test_rngs_held_by_the_module_give_fresh_keys_per_call():
    layer = FlaxLayer(NoiseNet(3, rngs=nnx.Rngs(0, noise=1)))
    x = normal_data(8)
    a, b = to_numpy(layer(x)), to_numpy(layer(x))
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------------ training mode


def test_without_training_arg_inference_uses_eval_mode_and_matches_manual_eval():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer="adam", loss="mse")
    x, y = normal_data(16), normal_data(16, dim=2, seed=1)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    predicted = model.predict(x, verbose=0)
    # The user's module was not put in another mode.
    assert module.drop.deterministic is False
    assert module.bn.use_running_average is False
    twin = MLP(3, 2, rngs=nnx.Rngs(9))
    nnx.update(twin, model.layers[0].flax_variables)
    twin.eval()
    np.testing.assert_allclose(predicted, np.asarray(twin(x)), atol=1e-5)
    # Deterministic at inference (dropout off), in predict and in plain calls.
    np.testing.assert_allclose(model.predict(x, verbose=0), predicted, atol=1e-6)
    np.testing.assert_allclose(to_numpy(model.layers[0](x)), predicted, atol=1e-5)


def test_without_training_arg_batchnorm_uses_batch_stats_in_training():
    module = BNNet(3, 4, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    x = normal_data(8, seed=2) * 3.0 + 1.0
    twin = BNNet(3, 4, rngs=nnx.Rngs(0))  # the same values as the layer's
    twin.train()
    out = to_numpy(layer(x, training=True))
    expected = np.asarray(twin(x))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Normalized by the batch's own statistics.
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    # The running averages moved exactly as in NNX's own train mode.
    np.testing.assert_allclose(
        to_numpy(weight_named(layer, "bn/mean")),
        np.asarray(twin.bn.mean.get_value()),
        rtol=1e-5,
        atol=1e-6,
    )
    # At inference, the running averages are used.
    twin.eval()
    np.testing.assert_allclose(to_numpy(layer(x)), np.asarray(twin(x)), rtol=1e-5, atol=1e-5)
    assert module.bn.use_running_average is False


def test_user_module_mode_unchanged_after_fit_and_predict():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    module.eval()  # the user chose eval mode: the layer still trains in train mode
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer="adam", loss="mse")
    x, y = normal_data(16), normal_data(16, dim=2, seed=1)
    variance = weight_named(model.layers[0], "bn/var")
    before = to_numpy(variance).copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    model.predict(x, verbose=0)
    assert module.drop.deterministic is True
    assert module.bn.use_running_average is True
    assert not np.allclose(before, to_numpy(variance))  # fit ran BatchNorm in train mode


def test_predict_and_evaluate_do_not_change_batch_stats():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)))])
    model.compile(optimizer="adam", loss="mse")
    x, y = normal_data(16), normal_data(16, dim=2, seed=1)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    before = [to_numpy(v).copy() for v in model.non_trainable_weights]
    model.predict(x * 5.0 + 3.0, verbose=0)
    model.evaluate(x * 5.0 + 3.0, y, verbose=0)
    model(x * 2.0)
    for a, v in zip(before, model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(a, to_numpy(v), err_msg=v.path)
