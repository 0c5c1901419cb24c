"""fit/evaluate/predict options, callbacks, summary, .weights.h5 save/load.

Behaviours that hold for Linen and NNX alike are one test parametrized by module kind: a Linen
`MLP` and an NNX `MLP` (3 -> 8 -> 2 with BatchNorm and dropout, the same weight counts).
"""

import io

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest
from flax import nnx

import nnx_models
from core_models import MLP
from flaxlayer import FlaxLayer
from helpers import changed_paths, to_numpy
from sample_data import make_data

# seed: the layer's seed (Linen: also the module's initial values); NNX: also the nnx.Rngs seed.
KINDS = {
    "linen": lambda seed=None: FlaxLayer(MLP(), seed=seed),
    "nnx": lambda seed=None: FlaxLayer(nnx_models.MLP(3, 2, rngs=nnx.Rngs(seed or 0)), seed=seed),
}


def _model(module=None, seed=None):
    return keras.Sequential(
        [keras.Input((3,)), FlaxLayer(module if module is not None else MLP(), seed=seed)]
    )


OPTIONS = {
    "default": {},
    "no_jit": {"jit_compile": False},
    "steps_per_execution": {"steps_per_execution": 2},
    "jit": {"jit_compile": True},
}
# NNX runs the default (jit under JAX) and no_jit only: its steps_per_execution is tested with
# callbacks in test_nnx_keras.py, and jit_compile=True under TF or torch would add long compiles
# (torch.compile: ~15 s).
CASES = [
    (kind, option)
    for kind in KINDS
    for option in OPTIONS
    if kind == "linen" or option in ("default", "no_jit")
]


@pytest.mark.parametrize(("kind", "option"), CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_fit_evaluate_predict_options(kind, option):
    """A Sequential model with the FlaxLayer before a Keras layer: every weight trains."""
    compile_kwargs = OPTIONS[option]
    if "steps_per_execution" in compile_kwargs and keras.backend.backend() == "torch":
        pytest.skip("Keras's PyTorch trainer only supports steps_per_execution=1")
    x, y = make_data(n=16, out_dim=1)
    model = keras.Sequential([keras.Input((3,)), KINDS[kind](), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"], **compile_kwargs
    )
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert set(history.history) == {"loss", "mae"}
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(history.history["loss"]))
    assert changed_paths(before, model.trainable_weights) == [
        v.path for v in model.trainable_weights
    ]
    loss, mae = model.evaluate(x, y, batch_size=8, verbose=0)
    assert np.isfinite(loss)
    assert np.isfinite(mae)
    pred = model.predict(x, batch_size=8, verbose=0)
    assert pred.shape == (16, 1)
    np.testing.assert_allclose(pred, model.predict(x, batch_size=8, verbose=0), rtol=1e-6)


def test_training_reduces_loss():
    g = np.random.default_rng(0)
    x = g.normal(size=(64, 3)).astype("float32")
    y = (x @ np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 1.0]], "float32")).astype("float32")
    model = _model(nn.Dense(2))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


def test_custom_callback_sees_logs():
    x, y = make_data(n=16)
    epochs, batches = [], []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(dict(logs))

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(dict(logs))

    model = _model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        x, y, validation_data=(x, y), epochs=2, batch_size=8, verbose=0, callbacks=[Recorder()]
    )
    assert len(batches) == 4
    assert len(epochs) == 2
    assert {"loss", "val_loss"} <= set(epochs[0])
    assert all(np.isfinite(e["val_loss"]) for e in epochs)


def test_early_stopping_ends_fit_early():
    x, y = make_data(n=16)
    model = _model()
    # Learning rate 0: the loss never improves by min_delta, so training stops early.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=1, min_delta=10.0)
    history = model.fit(x, y, epochs=20, batch_size=8, verbose=0, callbacks=[stop])
    assert len(history.history["loss"]) < 20
    assert stop.stopped_epoch > 0


def test_summary_and_count_params():
    layer = FlaxLayer(MLP(hidden=8, out=2))
    model = keras.Sequential([keras.Input((3,)), layer])
    # Dense 3->8 (32) + BatchNorm scale/bias (16) + Dense 8->2 (18) trainable;
    # BatchNorm mean/var (16) non-trainable.
    assert layer.count_params() == 32 + 16 + 18 + 16
    assert model.count_params() == 82
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 66
    assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == 16
    out = io.StringIO()
    model.summary(print_fn=lambda line, *a, **k: out.write(line + "\n"))
    text = out.getvalue()
    assert "FlaxLayer" in text
    assert "Total params: 82" in text
    assert "Trainable params: 66" in text
    assert "Non-trainable params: 16" in text
    assert "(None, 2)" in text


@pytest.mark.parametrize("kind", KINDS)
def test_weights_h5_save_and_load_into_fresh_model(kind, tmp_path):
    x, y = make_data(n=16)
    model = keras.Sequential([keras.Input((3,)), KINDS[kind](seed=1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    expected = model.predict(x, verbose=0)
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    assert path.exists()

    keras.backend.clear_session(free_memory=False)
    fresh = keras.Sequential([keras.Input((3,)), KINDS[kind](seed=2)])
    assert not np.allclose(fresh.predict(x, verbose=0), expected)
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), expected)
    # Every value, the BatchNorm statistics included.
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)


def test_get_set_weights_round_trip():
    x = make_data(n=8)[0]
    a, b = _model(seed=1), _model(seed=2)
    b.set_weights(a.get_weights())
    np.testing.assert_allclose(b.predict(x, verbose=0), a.predict(x, verbose=0), rtol=1e-6)


def test_flax_variables_are_snapshots_that_outlive_training():
    # Keras's JAX trainer donates the variables' buffers to each compiled step: views of them
    # would be deleted by the next fit/predict. flax_variables must stay usable and unchanged.
    x, y = make_data(n=16)
    model = _model(seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    layer = model.layers[0]
    snapshot = layer.flax_variables
    before = [np.array(leaf) for leaf in jax.tree.leaves(snapshot)]
    expected = model.predict(x, verbose=0)

    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    model.predict(x, verbose=0)

    after = [np.array(leaf) for leaf in jax.tree.leaves(snapshot)]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(MLP().apply(snapshot, x, training=False), expected, atol=1e-5)
    current = [np.array(leaf) for leaf in jax.tree.leaves(layer.flax_variables)]
    assert any(not np.array_equal(a, b) for a, b in zip(before, current, strict=True))
