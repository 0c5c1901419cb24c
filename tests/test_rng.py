"""Point 7: rng streams at init, per training call, at inference; reproducibility."""

import flax.linen as nn
import jax.numpy as jnp
import keras
import numpy as np

from conftest import make_data
from flaxlayer import FlaxLayer
from models import MLP, AugmentModule, DropoutModule, NoiseModule

X = np.ones((4, 16), "float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_init_gets_custom_stream_key():
    class InitNoise(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            # Asks for "noise" and "dropout" keys at init time.
            offset = self.variable(
                "consts",
                "offset",
                lambda: jnp.concatenate(
                    [
                        nn.initializers.normal(1.0)(self.make_rng("noise"), (2,)),
                        nn.initializers.normal(1.0)(self.make_rng("dropout"), (2,)),
                    ]
                ),
            )
            return nn.Dense(4)(inputs) + offset.value

    layer = FlaxLayer(InitNoise())
    out = _np(layer(np.ones((2, 3), "float32")))
    assert out.shape == (2, 4)
    offset = _np(layer.state["consts"]["offset"])
    assert np.all(offset != 0.0)


def test_stream_used_at_inference_gets_fresh_keys():
    layer = FlaxLayer(NoiseModule())
    model = keras.Sequential([keras.Input((16,)), layer])
    p1 = model.predict(X, verbose=0)
    p2 = model.predict(X, verbose=0)
    assert p1.shape == (4, 3)
    assert not np.allclose(p1, p2)
    c1, c2 = _np(layer(X)), _np(layer(X))
    assert not np.allclose(c1, c2)
    # Same noise key for every row? No: rows of one call differ too.
    assert not np.allclose(c1[0], c1[1])


def test_stream_used_at_inference_in_fit_and_evaluate():
    x, y = make_data(n=16, in_dim=16, out_dim=3)
    model = keras.Sequential([keras.Input((16,)), FlaxLayer(NoiseModule())])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    e1 = model.evaluate(x, y, verbose=0)
    e2 = model.evaluate(x, y, verbose=0)
    assert e1 != e2


def test_training_only_custom_stream_gets_fresh_keys():
    layer = FlaxLayer(AugmentModule())
    inference = _np(layer(X))
    np.testing.assert_allclose(inference, _np(layer(X)))  # deterministic at inference
    t1, t2 = _np(layer(X, training=True)), _np(layer(X, training=True))
    assert not np.allclose(t1, t2)
    assert not np.allclose(t1, inference)


def test_training_only_custom_stream_in_fit():
    x, y = make_data(n=16, in_dim=16, out_dim=3)
    model = keras.Sequential([keras.Input((16,)), FlaxLayer(AugmentModule())])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    p1, p2 = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_allclose(p1, p2)


def test_new_dropout_mask_each_training_call():
    layer = FlaxLayer(DropoutModule())
    np.testing.assert_allclose(_np(layer(X)), X)  # identity at inference
    m1, m2 = _np(layer(X, training=True)), _np(layer(X, training=True))
    assert set(np.unique(m1)) <= {0.0, 2.0}
    assert not np.array_equal(m1, m2)


def test_new_dropout_mask_each_fit_step():
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(float(logs["loss"]))

    # Constant data and a zero learning rate: only the dropout mask changes between steps.
    x = np.ones((8, 16), "float32")
    model = keras.Sequential([keras.Input((16,)), FlaxLayer(MLP(hidden=32, out=1))])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(
        x, np.zeros((8, 1), "float32"), epochs=3, batch_size=8, verbose=0, callbacks=[Record()]
    )
    assert len(seen) == 3
    assert len(set(seen)) > 1


class DenseDropout(nn.Module):
    @nn.compact
    def __call__(self, inputs, training):
        return nn.Dropout(0.5, deterministic=not training)(nn.Dense(8)(inputs))


def _training_run(seed=None):
    keras.backend.clear_session(free_memory=False)
    layer = FlaxLayer(DenseDropout(), seed=seed)
    x = make_data(n=8)[0]
    first = _np(layer(x, training=True))
    second = _np(layer(x, training=True))
    kernel = _np(layer.params["params"]["Dense_0"]["kernel"])
    return kernel, first, second


def test_set_random_seed_reproducible():
    keras.utils.set_random_seed(123)
    a = _training_run()
    keras.utils.set_random_seed(123)
    b = _training_run()
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a[1], a[2])  # new keys each call


def test_seed_argument_reproducible():
    a = _training_run(seed=7)
    b = _training_run(seed=7)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = _training_run(seed=8)
    assert not np.allclose(a[0], c[0])
    assert not np.allclose(a[1], c[1])


def test_seed_reproducible_fit():
    x, y = make_data(n=16)

    def run():
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP())])
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
        return history.history["loss"], model.predict(x, verbose=0)

    (loss_a, pred_a), (loss_b, pred_b) = run(), run()
    assert loss_a == loss_b
    np.testing.assert_array_equal(pred_a, pred_b)
