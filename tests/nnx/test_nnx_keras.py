"""The core Keras behaviours hold for NNX modules.

The ones shared with Linen (Functional, Sequential and subclassed models, pytree inputs and
outputs, the default and no-jit compile options, `.weights.h5`) are parametrized by module kind in
test_models_pytrees.py and test_keras_workflows.py.
"""

import keras
import numpy as np
import pytest
from flax import nnx

from flaxlayer import FlaxLayer
from helpers import changed_paths, to_numpy
from nnx_models import BNNet, NoiseNet
from sample_data import normal_data


def _x(n=16, dim=3, seed=0):
    return normal_data(n, dim, seed)


def _y(n=16, dim=2, seed=1):
    return normal_data(n, dim, seed)


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
        assert np.isfinite(to_numpy(out).astype("float32")).all()
    assert all(v.dtype == "float32" for v in layer.weights)
    mean = next(v for v in layer.weights if v.path.endswith("bn/mean"))
    assert not np.allclose(to_numpy(mean), 0.0)  # the training call updated the float32 stats


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
    before = [to_numpy(v).copy() for v in layer.weights]
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(v.dtype == "float32" for v in layer.weights)
    assert len(changed_paths(before, layer.weights)) == len(before)  # params and batch stats
    assert keras.backend.standardize_dtype(model.predict(x, verbose=0).dtype) == compute
    out = layer(x)
    assert keras.backend.standardize_dtype(out.dtype) == compute
    assert np.isfinite(to_numpy(out).astype("float32")).all()


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
    before = to_numpy(mean).copy()
    x, y = _x(32), _y(32)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)
    assert seen["epochs"] == 2
    assert seen["batches"] >= 2
    assert len(history.history["loss"]) == 2
    assert not np.allclose(before, to_numpy(mean))
    assert np.isfinite(model.evaluate(x, y, verbose=0))


def test_rng_stream_module_trains():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(NoiseNet(3, rngs=nnx.Rngs(0, noise=1)))])
    model.compile(optimizer="adam", loss="mse")
    x = _x()
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    model.fit(x, x, epochs=1, batch_size=8, verbose=0)
    assert len(changed_paths(before, model.trainable_weights)) == len(before)
    # The module draws fresh noise at every call, also in predict.
    assert not np.array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
