"""NNX point 7: the core Keras behaviours hold for NNX modules."""

import keras
import numpy as np
import pytest
from flax import nnx

from conftest import normal_data
from conftest import to_numpy as _np
from flaxlayer import FlaxLayer
from nnx_models import MLP, BNNet, NoiseNet, PytreeNet


def _x(n=16, dim=3, seed=0):
    return normal_data(n, dim, seed)


def _y(n=16, dim=2, seed=1):
    return normal_data(n, dim, seed)


def _changed(before, variables):
    return [v.path for b, v in zip(before, variables, strict=True) if not np.allclose(b, _np(v))]


def _fit_and_check(model, x, y, **compile_kwargs):
    model.compile(optimizer="adam", loss="mse", **compile_kwargs)
    before = [_np(v).copy() for v in model.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(_changed(before, model.trainable_weights)) == len(before)
    assert np.isfinite(history.history["loss"]).all()
    loss = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss)
    predicted = model.predict(x, verbose=0)
    assert predicted.shape == (len(x), 2)
    return predicted


def test_functional_model_with_unknown_batch_dimension():
    inputs = keras.Input((3,))
    layer = FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))
    outputs = layer(inputs)
    assert tuple(outputs.shape) == (None, 2)
    model = keras.Model(inputs, outputs)
    x, y = _x(), _y()
    predicted = _fit_and_check(model, x, y)
    # Any batch size works once built.
    np.testing.assert_allclose(model.predict(x[:5], verbose=0), predicted[:5], atol=1e-5)


def test_sequential_model():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))])
    _fit_and_check(model, _x(), _y())


class SubclassedModel(keras.Model):
    def __init__(self, module, **kwargs):
        super().__init__(**kwargs)
        self.body = FlaxLayer(module)
        self.head = keras.layers.Dense(2)

    def call(self, inputs, training=None):
        return self.head(self.body(inputs, training=training))


def test_subclassed_model_built_eagerly():
    model = SubclassedModel(MLP(3, 8, rngs=nnx.Rngs(0)))
    x, y = _x(), _y()
    model(x[:2])
    _fit_and_check(model, x, y)
    assert len(model.trainable_weights) == 6 + 2


def test_subclassed_model_built_by_fit():
    module = MLP(3, 8, rngs=nnx.Rngs(0))
    initial = np.asarray(module.linear1.kernel.get_value()).copy()
    model = SubclassedModel(module)
    model.compile(optimizer="adam", loss="mse")
    x, y = _x(), _y()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)  # builds the model
    assert np.isfinite(history.history["loss"]).all()
    assert len(model.trainable_weights) == 6 + 2
    kernel = next(v for v in model.body.weights if v.path.endswith("linear1/kernel"))
    assert kernel.shape == initial.shape
    assert not np.allclose(_np(kernel), initial)
    assert model.predict(x, verbose=0).shape == (len(x), 2)


def test_pytree_inputs_and_outputs():
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    layer = FlaxLayer(PytreeNet(rngs=nnx.Rngs(0)))
    head, total = layer(inputs)
    assert tuple(head.shape) == (None, 2)
    assert tuple(total.shape) == (None,)
    model = keras.Model(inputs, [head, total])
    model.compile(optimizer="adam", loss=["mse", "mse"])
    g = np.random.default_rng(0)
    x = {"a": g.normal(size=(16, 3)).astype("float32"), "b": g.normal(size=(16, 2)).astype("f4")}
    y = [g.normal(size=(16, 2)).astype("float32"), g.normal(size=(16,)).astype("float32")]
    before = [_np(v).copy() for v in model.trainable_weights]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert len(_changed(before, model.trainable_weights)) == len(before)
    p_head, p_total = model.predict(x, verbose=0)
    assert p_head.shape == (16, 2) and p_total.shape == (16,)
    out = layer(x)
    assert isinstance(out, tuple) and len(out) == 2
    np.testing.assert_allclose(_np(out[0]), p_head, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("how", ["global", "layer"])
def test_mixed_precision_eager_calls(policy, how):
    compute = policy.removeprefix("mixed_")
    if how == "global":
        keras.config.set_dtype_policy(policy)
        layer = FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)))
    else:
        layer = FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)), dtype=policy)
    x = _x()
    for training in (False, True):
        out = layer(x, training=training)
        assert keras.backend.standardize_dtype(out.dtype) == compute
        assert np.isfinite(_np(out).astype("float32")).all()
    assert all(v.dtype == "float32" for v in layer.weights)
    mean = next(v for v in layer.weights if v.path.endswith("bn/mean"))
    assert not np.allclose(_np(mean), 0.0)  # the training call updated the float32 stats


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("how", ["global", "layer"])
def test_mixed_precision_in_models(policy, how):
    compute = policy.removeprefix("mixed_")
    if how == "global":
        keras.config.set_dtype_policy(policy)
        layer = FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)))
    else:
        layer = FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)), dtype=policy)
    inputs = keras.Input((3,))
    symbolic = layer(inputs)
    assert keras.backend.standardize_dtype(symbolic.dtype) == compute
    model = keras.Model(inputs, symbolic)
    assert all(v.dtype == "float32" for v in layer.weights)
    x, y = _x(), _y()
    model.compile(optimizer="adam", loss="mse")
    before = [_np(v).copy() for v in layer.weights]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(v.dtype == "float32" for v in layer.weights)
    assert len(_changed(before, layer.weights)) == len(before)  # params and batch stats
    assert keras.backend.standardize_dtype(model.predict(x, verbose=0).dtype) == compute
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert np.isfinite(_np(out).astype("float32")).all()


def test_jit_compile_false():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))])
    _fit_and_check(model, _x(), _y(), jit_compile=False)


def test_steps_per_execution_and_callbacks():
    steps = 1 if keras.backend.backend() == "torch" else 2  # Keras's torch trainer: 1 only
    layer = FlaxLayer(BNNet(3, 2, rngs=nnx.Rngs(0)))
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse", steps_per_execution=steps)
    seen = {"epochs": 0, "batches": 0}
    callbacks = [
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: seen.__setitem__("epochs", seen["epochs"] + 1),
            on_train_batch_end=lambda b, logs: seen.__setitem__("batches", seen["batches"] + 1),
        ),
        keras.callbacks.EarlyStopping(monitor="loss", patience=5),
    ]
    mean = next(v for v in layer.weights if v.path.endswith("bn/mean"))
    before = _np(mean).copy()
    x, y = _x(32), _y(32)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)
    assert seen["epochs"] == 2
    assert seen["batches"] >= 2
    assert len(history.history["loss"]) == 2
    assert not np.allclose(before, _np(mean))
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_rng_stream_module_trains():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(NoiseNet(3, rngs=nnx.Rngs(0, noise=1)))])
    model.compile(optimizer="adam", loss="mse")
    x = _x()
    before = [_np(v).copy() for v in model.trainable_weights]
    model.fit(x, x, epochs=1, batch_size=8, verbose=0)
    assert len(_changed(before, model.trainable_weights)) == len(before)
    # The module draws fresh noise at every call, also in predict.
    assert not np.array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_weights_h5_round_trip_into_a_freshly_built_model(tmp_path):
    x, y = _x(), _y()
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(0)))])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "nnx.weights.h5"
    model.save_weights(path)
    fresh = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(3, 2, rngs=nnx.Rngs(1)))])
    assert not np.allclose(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(_np(a), _np(b))
