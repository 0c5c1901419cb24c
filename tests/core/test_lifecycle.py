"""A layer's loading lifecycle: every phase a layer can be in, and every transition between
them, reached through what users and Keras do (construct, `from_config`, build, load weights,
`set_weights`, use before weights, Keras reading variables while it loads a model).
"""

import itertools

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest
from keras.src.saving.serialization_lib import SafeModeScope

from flaxlayer import FlaxLayer, JaxLayer
from flaxlayer._lifecycle import TRANSITIONS, Lifecycle, Phase


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.relu(nn.Dense(4)(x)))


def _fresh():
    layer = FlaxLayer(TwoDense(), name="two", seed=3)
    layer.build((None, 3))
    return layer


def _configured(fresh):
    return FlaxLayer.from_config(fresh.get_config())


def _deferred(fresh):
    """Built from the file's build config as Keras's loader builds it (in its safe-mode scope)."""
    layer = _configured(fresh)
    with SafeModeScope(True):
        layer.build_from_config(fresh.get_build_config())
    return layer


def _after_build_from_file():
    """Keras's torch layers read every variable right after build: placeholders there."""
    return Phase.PLACEHOLDERS if keras.backend.backend() == "torch" else Phase.DEFERRED


def _values(layer):
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in layer.weights]


def test_a_users_layer_is_fresh_before_and_after_build():
    layer = FlaxLayer(TwoDense())
    assert layer._lifecycle.phase is Phase.FRESH
    layer.build((None, 3))
    assert layer._lifecycle.phase is Phase.FRESH


def test_from_config_gives_a_configured_layer_that_is_not_built():
    layer = _configured(_fresh())
    assert layer._lifecycle.phase is Phase.CONFIGURED
    assert not layer.built


def test_building_a_configured_layer_allocates_no_value_the_file_sizes():
    layer = _deferred(_fresh())
    assert layer._lifecycle.phase is _after_build_from_file()
    if layer._lifecycle.phase is Phase.DEFERRED:
        assert layer.weights and all(w._value is None for w in layer.weights)


def test_outside_keras_loading_torch_reading_variables_fills_initial_values():
    if keras.backend.backend() != "torch":
        pytest.skip("only Keras's torch layers read every variable right after build")
    fresh = _fresh()
    layer = _configured(fresh)
    layer.build_from_config(fresh.get_build_config())
    assert layer._lifecycle.phase is Phase.FILLED
    assert any(np.abs(v).sum() > 0 for v in _values(layer))


def test_loading_weights_fills_a_deferred_layer_with_the_files_values(tmp_path):
    fresh = _fresh()
    fresh_model = keras.Sequential([keras.Input((3,)), fresh])
    fresh_model.save_weights(tmp_path / "w.weights.h5")
    layer = _deferred(fresh)
    keras.Sequential([keras.Input((3,)), layer]).load_weights(tmp_path / "w.weights.h5")
    assert layer._lifecycle.phase is Phase.FILLED
    for got, want in zip(_values(layer), _values(fresh), strict=True):
        np.testing.assert_array_equal(got, want)


def test_set_weights_fills_a_deferred_layer():
    fresh = _fresh()
    layer = _deferred(fresh)
    layer.set_weights(_values(fresh))
    assert layer._lifecycle.phase is Phase.FILLED
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(fresh(x)), rtol=1e-6
    )


def test_first_use_without_weights_fills_a_deferred_layer_with_initial_values():
    layer = _deferred(_fresh())
    out = keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32")))
    assert layer._lifecycle.phase is Phase.FILLED
    assert np.isfinite(out).all()
    assert any(np.abs(v).sum() > 0 for v in _values(layer))  # an init, not zeros


def test_keras_reading_variables_while_loading_gives_placeholders_then_a_call_fills_them():
    layer = _deferred(_fresh())
    with SafeModeScope(True):  # what Keras's loader sets while it deserializes a file
        layer.weights[0].value  # noqa: B018 - Keras's torch/TF model build reads variables
    if keras.backend.backend() == "jax":  # JAX has no placeholders: a read gives init values
        assert layer._lifecycle.phase is Phase.FILLED
        return
    assert layer._lifecycle.phase is Phase.PLACEHOLDERS
    out = keras.ops.convert_to_numpy(layer(np.ones((2, 3), "float32")))
    assert layer._lifecycle.phase is Phase.FILLED
    assert np.isfinite(out).all()


def test_placeholders_are_filled_by_the_weights_file(tmp_path):
    if keras.backend.backend() == "jax":
        pytest.skip("the JAX backend reads no variable while loading: no placeholders")
    fresh = _fresh()
    keras.Sequential([keras.Input((3,)), fresh]).save_weights(tmp_path / "w.weights.h5")
    layer = _deferred(fresh)
    with SafeModeScope(True):
        layer.weights[0].value  # noqa: B018
    assert layer._lifecycle.phase is Phase.PLACEHOLDERS
    keras.Sequential([keras.Input((3,)), layer]).load_weights(tmp_path / "w.weights.h5")
    assert layer._lifecycle.phase is Phase.FILLED
    for got, want in zip(_values(layer), _values(fresh), strict=True):
        np.testing.assert_array_equal(got, want)


def test_only_the_listed_transitions_are_allowed():
    for start, end in itertools.product(Phase, Phase):
        lifecycle = Lifecycle()
        lifecycle.phase = start
        if end in TRANSITIONS[start]:
            lifecycle.move_to(end)
            assert lifecycle.phase is end
            assert lifecycle.has_values == (end in (Phase.FRESH, Phase.FILLED))
        else:
            with pytest.raises(RuntimeError, match="internal error"):
                lifecycle.move_to(end)


def test_every_phase_is_reachable_from_fresh():
    reached, frontier = {Phase.FRESH}, [Phase.FRESH]
    while frontier:
        nxt = TRANSITIONS[frontier.pop()] - reached
        reached |= nxt
        frontier += nxt
    assert reached == set(Phase)


INIT_CALLS = []


@keras.saving.register_keras_serializable(package="lifecycle_test")
def counted_init(rng, inputs):
    INIT_CALLS.append(1)
    return {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}


@keras.saving.register_keras_serializable(package="lifecycle_test")
def counted_call(params, inputs):
    return inputs @ params["w"]


def test_initial_values_of_a_layer_from_a_file_are_made_once():
    """Reading its variables and calling it after the first use never runs init again."""
    fresh = JaxLayer(counted_call, counted_init, name="counted")
    fresh.build((None, 3))
    layer = JaxLayer.from_config(fresh.get_config())
    layer.build_from_config(fresh.get_build_config())
    x = np.ones((2, 3), "float32")
    layer(x)
    before = len(INIT_CALLS)
    _values(layer)
    layer(x)
    assert len(INIT_CALLS) == before
    assert layer._lifecycle.phase is Phase.FILLED
