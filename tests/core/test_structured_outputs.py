"""Dataclass outputs (a `flax.struct` dataclass such as Hugging Face's `ModelOutput`, nested
plain dataclasses) reach Keras as dicts of their non-None fields, on every backend: the call,
Keras's output spec, `predict`, `fit` on one of them and a file agree."""

import keras
import numpy as np

import dict_models as dm
from flaxlayer import FlaxLayer
from helpers import save_load, to_numpy

X = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")


def _expected(layer):
    out = dm.StructOutputs().apply(layer.flax_variables, X)
    return {"last_hidden_state": out.last_hidden_state, "pooled": {"logits": out.pooled.logits}}


def _assert_tree_close(actual, expected, atol=1e-6):
    assert isinstance(actual, dict) and set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_tree_close(actual[key], value, atol)
        else:
            np.testing.assert_allclose(to_numpy(actual[key]), np.asarray(value), atol=atol)


def test_dataclass_outputs_are_dicts_of_their_non_none_fields():
    layer = FlaxLayer(dm.StructOutputs())
    _assert_tree_close(layer(X), _expected(layer))  # no "attentions" (None), "extra" (None)


def test_output_spec_and_predict_agree_on_the_dict():
    layer = FlaxLayer(dm.StructOutputs())
    inputs = keras.Input((3,))
    symbolic = layer(inputs)
    assert set(symbolic) == {"last_hidden_state", "pooled"}
    assert tuple(symbolic["pooled"]["logits"].shape) == (None, 2)
    model = keras.Model(inputs, symbolic)
    _assert_tree_close(model.predict(X, verbose=0), _expected(layer), atol=1e-5)


def test_fit_on_one_field_and_load_from_a_file(tmp_path):
    layer = FlaxLayer(dm.StructOutputs())
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs)["pooled"]["logits"])
    model.compile("adam", "mse")
    history = model.fit(X, np.ones((4, 2), "float32"), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_allclose(
        model.predict(X, verbose=0), np.asarray(_expected(layer)["pooled"]["logits"]), atol=1e-5
    )
    loaded = save_load(model, tmp_path)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0), atol=1e-6)
