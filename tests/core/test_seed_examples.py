"""The seed's two examples run unchanged and train with fit."""

import io

import keras
import numpy as np

from core_models import MyFlaxModule, TwoInputModule, my_flax_module_wrapper
from flaxlayer import FlaxLayer


def test_first_example_param_count_and_fit():
    flax_module = MyFlaxModule()
    keras_layer = FlaxLayer(flax_module)

    model = keras.Sequential([keras.Input((28, 28, 1)), keras_layer])
    assert model.count_params() == 1_256_930
    assert keras_layer.count_params() == 1_256_930
    assert model.output_shape == (None, 10)

    g = np.random.default_rng(0)
    x = g.random((8, 28, 28, 1), dtype=np.float32)
    y = g.integers(0, 10, size=(8,))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = keras.ops.convert_to_numpy(keras_layer.params["params"]["Dense_1"]["kernel"]).copy()
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = keras.ops.convert_to_numpy(keras_layer.params["params"]["Dense_1"]["kernel"])
    assert not np.allclose(before, after)

    probs = model.predict(x, verbose=0)
    assert probs.shape == (8, 10)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)

    out = io.StringIO()
    model.summary(print_fn=lambda line, *a, **k: out.write(line + "\n"))
    assert "1,256,930" in out.getvalue()


def test_second_example_wrapper_two_inputs_and_fit():
    flax_module = TwoInputModule()
    keras_layer = FlaxLayer(
        module=flax_module,
        method=my_flax_module_wrapper,
    )
    in1, in2 = keras.Input((3,)), keras.Input((2,))
    outputs = keras_layer([in1, in2])
    assert tuple(outputs.shape) == (None, 2)
    model = keras.Model([in1, in2], outputs)

    g = np.random.default_rng(1)
    x1 = g.normal(size=(16, 3)).astype("float32")
    x2 = g.normal(size=(16, 2)).astype("float32")
    y = g.normal(size=(16, 2)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    history = model.fit([x1, x2], y, epochs=2, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))

    # Inference is deterministic (deterministic=not training=True): same input, same output,
    # and it equals the pure-Flax forward pass with the layer's variables.
    p1 = model.predict([x1, x2], verbose=0)
    p2 = model.predict([x1, x2], verbose=0)
    np.testing.assert_allclose(p1, p2)
    expected = flax_module.apply(
        keras_layer.flax_variables, x1, x2, True, method=TwoInputModule.forward
    )
    np.testing.assert_allclose(p1, np.asarray(expected), rtol=1e-5, atol=1e-6)

    # In training, dropout is active: two training calls differ.
    t1 = keras.ops.convert_to_numpy(keras_layer([x1, x2], training=True))
    t2 = keras.ops.convert_to_numpy(keras_layer([x1, x2], training=True))
    assert not np.allclose(t1, t2)
