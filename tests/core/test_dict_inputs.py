"""Dict inputs bind by name: a dict whose keys all name parameters of the method, the inputs
parameter among them, is spread over those parameters when the method takes more than one by
name; any other inputs (a method of one parameter, a key no parameter has, a training flag)
go whole to the inputs parameter, as before."""

import keras
import numpy as np
import pytest
from flax import nnx

import dict_models as dm
from flaxlayer import FlaxLayer
from helpers import save_load, to_numpy

IDS = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]], "int32")
MASK = (IDS != 0).astype("int32")
POSITIONS = np.broadcast_to(np.arange(4), IDS.shape).astype("int32")
NAMED = {"input_ids": IDS, "attention_mask": MASK}


def test_dict_of_named_inputs_binds_each_value_to_its_parameter():
    layer = FlaxLayer(dm.MaskedEncoder())
    out = to_numpy(layer(NAMED))
    expected = dm.MaskedEncoder().apply(layer.flax_variables, IDS, MASK)
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-6)


def test_an_optional_parameter_in_the_dict_is_passed_too():
    with_positions = {**NAMED, "position_ids": POSITIONS}
    layer = FlaxLayer(dm.MaskedEncoder())
    out = to_numpy(layer(with_positions))
    assert "positions" in layer.params["params"]  # created by the call that got position_ids
    expected = dm.MaskedEncoder().apply(layer.flax_variables, IDS, MASK, POSITIONS)
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-6)


def test_nnx_method_takes_a_dict_by_name():
    module = dm.NNXMasked(rngs=nnx.Rngs(0))
    expected = np.asarray(module(IDS, MASK))
    np.testing.assert_allclose(to_numpy(FlaxLayer(module)(NAMED)), expected, atol=1e-6)


def test_dict_inputs_predict_fit_and_load_from_a_file(tmp_path):
    inputs = {name: keras.Input((4,), dtype="int32", name=name) for name in NAMED}
    layer = FlaxLayer(dm.MaskedEncoder())
    model = keras.Model(inputs, layer(inputs))
    model.compile("adam", "mse")
    before = to_numpy(layer.params["params"]["Dense_0"]["kernel"]).copy()
    history = model.fit(NAMED, np.ones((3, 3), "float32"), epochs=2, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(to_numpy(layer.params["params"]["Dense_0"]["kernel"]), before)
    predicted = model.predict(NAMED, verbose=0)
    pure = dm.MaskedEncoder().apply(layer.flax_variables, IDS, MASK)
    np.testing.assert_allclose(predicted, np.asarray(pure), atol=1e-5)
    loaded = save_load(model, tmp_path)
    np.testing.assert_allclose(loaded.predict(NAMED, verbose=0), predicted, atol=1e-6)


def test_a_method_of_one_parameter_gets_the_dict_whole():
    batch = {"x": np.ones((2, 3), "float32"), "scale": np.full((2, 3), 2.0, "float32")}
    layer = FlaxLayer(dm.OneDict())
    out = to_numpy(layer(batch))
    expected = dm.OneDict().apply(layer.flax_variables, batch)
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-6)


def test_a_dict_with_a_key_no_parameter_names_goes_whole():
    batch = {"x": np.ones((2, 3), "float32"), "other": np.full((2, 3), 2.0, "float32")}
    layer = FlaxLayer(dm.TwoArgs())
    out = to_numpy(layer(batch))
    expected = dm.TwoArgs().apply(layer.flax_variables, batch)
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-6)


def test_the_training_flag_is_never_taken_from_the_dict():
    layer = FlaxLayer(dm.MaskedEncoder(), name="encoder")
    with pytest.raises(ValueError, match="`attention_mask`") as info:
        layer({**NAMED, "deterministic": np.zeros((3,), "int32")})  # not spread: goes whole
    assert "call the layer with a dict that names them" in str(info.value)


def test_a_dict_missing_a_required_parameter_says_which_key_to_add():
    layer = FlaxLayer(dm.MaskedEncoder(), name="encoder")
    with pytest.raises(ValueError) as info:
        layer({"input_ids": IDS})
    message = str(info.value)
    assert "FlaxLayer 'encoder'" in message
    assert "it also needs 'attention_mask'" in message
    assert "{'input_ids': ..., 'attention_mask': ...}" in message
