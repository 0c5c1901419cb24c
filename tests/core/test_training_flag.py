"""`training` is True in fit and False in predict, evaluate and plain calls.

The entry-point test runs for a Linen and an NNX module (parametrized by module kind): both
count their training and inference calls in `train_calls` and `infer_calls` variables.
"""

import keras
import numpy as np
import pytest
from flax import nnx

from core_models import TrainingFlagModule, TrainingRecorder
from flaxlayer import FlaxLayer
from helpers import flax_inference, to_numpy, weight_named
from nnx_models import TrainingNet
from sample_data import make_data

KINDS = {"linen": TrainingRecorder, "nnx": lambda: TrainingNet(3, 2, rngs=nnx.Rngs(0))}


def _counters(layer):
    return tuple(
        int(to_numpy(weight_named(layer, name))) for name in ("train_calls", "infer_calls")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_training_flag_per_keras_entry_point(kind):
    x, y = make_data(n=16)
    layer = FlaxLayer(KINDS[kind]())
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    assert _counters(layer) == (0, 0)

    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # 2 training steps
    assert _counters(layer) == (2, 0)

    model.predict(x, batch_size=8, verbose=0)  # 2 inference steps
    assert _counters(layer) == (2, 2)

    model.evaluate(x, y, batch_size=16, verbose=0)  # 1 inference step
    assert _counters(layer) == (2, 3)

    layer(x)  # plain call: inference
    assert _counters(layer) == (2, 4)
    model(x)
    assert _counters(layer) == (2, 5)

    layer(x, training=True)
    assert _counters(layer) == (3, 5)

    # A plain call gives what the module gives in Flax itself with training=False.
    np.testing.assert_allclose(to_numpy(layer(x)), flax_inference(layer, x), rtol=1e-5, atol=1e-5)


def test_training_flag_in_outputs_and_losses():
    x = np.ones((8, 3), "float32")
    layer = FlaxLayer(TrainingFlagModule())
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="sgd", loss="mse")

    np.testing.assert_allclose(model.predict(x, verbose=0), 0.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), 0.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x, training=True)), 1.0)
    # evaluate runs in inference: output 0 vs target 0.
    assert model.evaluate(x, np.zeros_like(x), verbose=0) == 0.0
    # fit runs in training: output 1 vs target 0 -> mse 1.
    history = model.fit(x, np.zeros_like(x), epochs=1, batch_size=8, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], 1.0, rtol=1e-6)


def test_validation_during_fit_is_inference():
    x = np.ones((8, 3), "float32")
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(TrainingFlagModule())])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(
        x, np.zeros_like(x), validation_data=(x, np.zeros_like(x)), epochs=1, verbose=0
    )
    np.testing.assert_allclose(history.history["loss"][0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(history.history["val_loss"][0], 0.0, atol=1e-7)
