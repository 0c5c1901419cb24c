"""NNX points 3 and 4: rng state inside NNX modules, and the training mode."""

import jax
import keras
import numpy as np
import pytest
from flax import nnx

from conftest import to_numpy as _np
from flaxlayer import FlaxLayer
from nnx_models import MLP, BNNet, DropNet, NoiseNet, TrainingNet


def _x(n=8, dim=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")


def _y(n=8, dim=2, seed=1):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")


def _var(layer, suffix):
    matches = [v for v in layer.weights if v.path.endswith(suffix)]
    assert len(matches) == 1, (suffix, [v.path for v in layer.weights])
    return matches[0]


def _drop_net(impl=None):
    rngs = nnx.Rngs(0) if impl is None else nnx.Rngs(0, dropout=jax.random.key(1, impl=impl))
    return DropNet(3, 16, rngs=rngs)


# ------------------------------------------------------------------------------ point 3


@pytest.mark.parametrize("impl", [None, "rbg"], ids=["default-keys", "rbg-keys"])
def test_dropout_differs_at_every_training_call(impl):
    layer = FlaxLayer(_drop_net(impl))
    x = _x()
    outs = [_np(layer(x, training=True)) for _ in range(3)]
    assert not np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[1], outs[2])
    assert not np.array_equal(outs[0], outs[2])
    # Dropout really dropped (about half of the units are zero).
    assert 0.2 < np.mean(outs[0] == 0.0) < 0.8
    # Inference is deterministic and drops nothing.
    np.testing.assert_array_equal(_np(layer(x)), _np(layer(x)))
    assert np.all(_np(layer(x)) != 0.0)


def test_rngs_held_by_the_module_give_fresh_keys_per_call():
    layer = FlaxLayer(NoiseNet(3, rngs=nnx.Rngs(0, noise=1)))
    x = _x()
    a, b = _np(layer(x)), _np(layer(x))
    assert not np.array_equal(a, b)


def test_dropout_differs_at_every_fit_step():
    """With a zero learning rate, the per-step losses differ only through dropout."""
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(_drop_net())])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    x, y = _x(8), _y(8, 16)
    model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=[callback])
    assert len(losses) == 3
    assert len(set(losses)) == 3


def _training_outputs(layer, x, n=2):
    return [_np(layer(x, training=True)) for _ in range(n)]


@pytest.mark.parametrize("make", [_drop_net, lambda: NoiseNet(3, rngs=nnx.Rngs(0, noise=1))])
def test_reproducible_with_set_random_seed(make):
    x = _x()
    keras.utils.set_random_seed(42)
    first = _training_outputs(FlaxLayer(make()), x)
    keras.utils.set_random_seed(42)
    second = _training_outputs(FlaxLayer(make()), x)
    keras.utils.set_random_seed(43)
    third = _training_outputs(FlaxLayer(make()), x)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], third[0])


def test_reproducible_with_seed_argument():
    x = _x()
    first = _training_outputs(FlaxLayer(_drop_net(), seed=3), x)
    second = _training_outputs(FlaxLayer(_drop_net(), seed=3), x)
    other = _training_outputs(FlaxLayer(_drop_net(), seed=4), x)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


def test_fit_is_reproducible_with_set_random_seed():
    x, y = _x(16), _y(16)

    def run(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))])
        model.compile(optimizer="adam", loss="mse")
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        return [_np(v) for v in model.weights]

    a, b, c = run(5), run(5), run(6)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, w) for u, w in zip(a, c, strict=True))


# ------------------------------------------------------------------------------ point 4


def test_method_taking_training_gets_true_in_fit_and_false_at_inference():
    module = TrainingNet(3, 2, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    x, y = _x(16), _y(16)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert int(_np(_var(layer, "train_calls"))) == 4  # training=True at each of the 4 steps
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    layer(x)
    assert int(_np(_var(layer, "train_calls"))) == 4
    layer(x, training=True)
    assert int(_np(_var(layer, "train_calls"))) == 5
    twin = TrainingNet(3, 2, rngs=nnx.Rngs(1))
    nnx.update(twin, layer.flax_variables)
    np.testing.assert_allclose(_np(layer(x)), np.asarray(twin(x, training=False)), atol=1e-5)


def test_without_training_arg_inference_uses_eval_mode_and_matches_manual_eval():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer="adam", loss="mse")
    x, y = _x(16), _y(16)
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
    np.testing.assert_allclose(_np(model.layers[0](x)), predicted, atol=1e-5)


def test_without_training_arg_batchnorm_uses_batch_stats_in_training():
    module = BNNet(3, 4, rngs=nnx.Rngs(0))
    layer = FlaxLayer(module)
    x = _x(8, seed=2) * 3.0 + 1.0
    twin = BNNet(3, 4, rngs=nnx.Rngs(0))  # the same values as the layer's
    twin.train()
    out = _np(layer(x, training=True))
    expected = np.asarray(twin(x))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Normalized by the batch's own statistics.
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    # The running averages moved exactly as in NNX's own train mode.
    np.testing.assert_allclose(
        _np(_var(layer, "bn/mean")), np.asarray(twin.bn.mean.get_value()), rtol=1e-5, atol=1e-6
    )
    # At inference, the running averages are used.
    twin.eval()
    np.testing.assert_allclose(_np(layer(x)), np.asarray(twin(x)), rtol=1e-5, atol=1e-5)
    assert module.bn.use_running_average is False


def test_user_module_mode_unchanged_after_fit_and_predict():
    module = MLP(3, 2, rngs=nnx.Rngs(0))
    module.eval()  # the user chose eval mode: the layer still trains in train mode
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    model.compile(optimizer="adam", loss="mse")
    x, y = _x(16), _y(16)
    variance = _var(model.layers[0], "bn/var")
    before = _np(variance).copy()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    model.predict(x, verbose=0)
    assert module.drop.deterministic is True
    assert module.bn.use_running_average is True
    assert not np.allclose(before, _np(variance))  # fit ran BatchNorm in train mode


def test_predict_and_evaluate_do_not_change_batch_stats():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)))])
    model.compile(optimizer="adam", loss="mse")
    x, y = _x(16), _y(16)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    before = [_np(v).copy() for v in model.non_trainable_weights]
    model.predict(x * 5.0 + 3.0, verbose=0)
    model.evaluate(x * 5.0 + 3.0, y, verbose=0)
    model(x * 2.0)
    for a, v in zip(before, model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(a, _np(v), err_msg=v.path)
