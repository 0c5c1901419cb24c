"""Flax code written as real projects write it runs unchanged, on every backend.

1. Method arguments: the first argument gets the inputs whatever its name; `training`, `train`,
   `is_training` get the flag and `deterministic` its negation; other arguments keep their
   defaults (Linen and NNX).
2. Config objects (dataclasses, `flax.struct` dataclasses, `to_dict`/`from_dict` classes, nested,
   Optional, subclasses) round-trip through `.keras`; a file cannot choose another class, and a
   config in a field declared `Any` loads only if its class is defined beside a module class
   the file builds (test_config_types.py has siblings, loose fields and enums).
3. A `method` function next to the module class loads with no custom_objects; a registered one
   too; any other function fails `model.save` with the line that fixes it.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import real_code_models as rc
from flaxlayer import FlaxLayer, SerializationError
from helpers import only_layer_config, rewrite_config, save_load, to_numpy

X = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")


# -------------------------------------------------------------------------- 1. arguments


def test_train_flag_drives_batchnorm_and_dropout():
    layer = FlaxLayer(rc.TrainFlag())
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("sgd", "mse")
    before = to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"])
    model.fit(X, Y, epochs=1, batch_size=4, verbose=0)
    after = to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"])
    assert not np.allclose(before, after), "fit must pass train=True (batch statistics move)"
    expected = rc.TrainFlag().apply(layer.flax_variables, X, train=False)
    np.testing.assert_allclose(model.predict(X, verbose=0), expected, atol=1e-5)


def test_every_flag_name_gets_the_flag_and_other_arguments_keep_defaults():
    layer = FlaxLayer(rc.EveryFlag())
    ids = np.ones((2, 5), "int32")
    np.testing.assert_allclose(to_numpy(layer(ids)), [[1.0, 0.0]] * 2)
    np.testing.assert_allclose(to_numpy(layer(ids, training=True)), [[0.0, 1.0]] * 2)


def test_nnx_method_takes_train():
    layer = FlaxLayer(rc.NNXTrain(rngs=nnx.Rngs(0)))
    x = X[:2]
    np.testing.assert_allclose(to_numpy(layer(x, training=True)) - to_numpy(layer(x)), 1.0)


# ---------------------------------------------------------------------- 2. config objects


CONFIGURED = {
    "dataclass": lambda: rc.Configured(
        rc.OuterConfig(rc.InnerConfig(width=3, activation=nn.relu), depth=2, sizes=(3, (4,)))
    ),
    "subclass": lambda: rc.Configured(rc.WiderOuterConfig(depth=2, extra=7)),
    "optional": lambda: rc.OptionalConfigured(rc.OuterConfig(rc.InnerConfig(width=5))),
    "struct": lambda: rc.StructConfigured(rc.StructConfig(width=2, scale=0.5)),
    "to_dict": lambda: rc.DictConfigured(
        rc.DictStyleConfig(hidden_size=6, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    ),
}


@pytest.mark.parametrize("kind", sorted(CONFIGURED))
def test_config_objects_round_trip(kind, tmp_path):
    module = CONFIGURED[kind]()
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    expected = model.predict(X, verbose=0)
    loaded = save_load(model, tmp_path)
    config = loaded.layers[0].module.config
    assert type(config) is type(module.config)
    if dataclasses.is_dataclass(config):
        assert config == module.config
    else:
        assert config.to_dict() == module.config.to_dict()  # int keys of id2label kept
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-6)


def test_nnx_module_holding_a_config_round_trips(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), FlaxLayer(rc.NNXConfigured(rc.NNXConfig(features=5), rngs=nnx.Rngs(0)))]
    )
    expected = model.predict(X, verbose=0)
    loaded = save_load(model, tmp_path)
    assert loaded.layers[0].module.config == rc.NNXConfig(features=5)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-6)


def test_config_in_an_undeclared_field_beside_the_module_class_round_trips(tmp_path):
    """`config: Any` holding OuterConfig, defined in the module of Undeclared: saved and loaded
    (test_config_types.py shows a config beside no saved module class failing at save)."""
    module = rc.Undeclared(rc.OuterConfig(rc.InnerConfig(width=3)))
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module, name="loose")])
    expected = model.predict(X, verbose=0)
    loaded = save_load(model, tmp_path)
    assert loaded.layers[0].module.config == module.config
    np.testing.assert_allclose(loaded.predict(X, verbose=0), expected, atol=1e-6)


CONSTRUCTED: list = []


@dataclasses.dataclass(frozen=True)
class Spy(rc.InnerConfig):
    """Records every construction (a file naming it where it is not declared must not build it)."""

    def __post_init__(self):
        CONSTRUCTED.append(self)


@pytest.mark.parametrize(
    ("where", "ref"),
    [
        ("outer", {"module": "real_code_models", "qualname": "OtherConfig"}),
        ("outer", {"module": __name__, "qualname": "Spy"}),
        ("inner", {"module": "os", "qualname": "system"}),
        ("inner", {"module": "real_code_models", "qualname": "Configured"}),
    ],
)
def test_a_file_cannot_choose_the_config_class(where, ref, tmp_path):
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(CONFIGURED["dataclass"]())])
    save_load(model, tmp_path)  # the untampered file loads
    path = tmp_path / "model.keras"
    tampered = tmp_path / "tampered.keras"

    def edit(module):
        entry = module["fields"]["config"]
        if where == "inner":
            entry = entry["fields"]["inner"]
        entry["class"] = ref

    rewrite_config(path, tampered, lambda config: edit(only_layer_config(config)["module"]))
    CONSTRUCTED.clear()
    with pytest.raises(SerializationError) as info:
        keras.saving.load_model(tampered)
    assert "config" in str(info.value) and ref["qualname"] in str(info.value)
    assert CONSTRUCTED == []


def test_a_config_entry_in_an_undeclared_field_is_refused(tmp_path):
    """The same file, with the module class swapped for one whose `config` is `Any` and the
    config class for one defined beside no module class the file builds."""
    import lm1b_models  # imported by this process: the refusal is the rule's, not an import's

    path = tmp_path / "declared.keras"
    module = rc.OptionalConfigured(rc.OuterConfig())
    keras.Sequential([keras.Input((3,)), FlaxLayer(module)]).save(path)
    tampered = tmp_path / "tampered.keras"

    def edit(module):
        module["class"] = {"module": "real_code_models", "qualname": "Undeclared"}
        config = module["fields"]["config"]
        config["class"] = {"module": lm1b_models.__name__, "qualname": "TransformerConfig"}
        config["fields"] = {}

    rewrite_config(path, tampered, lambda config: edit(only_layer_config(config)["module"]))
    with pytest.raises(SerializationError, match="module of a Flax module class") as info:
        keras.saving.load_model(tampered)
    assert "TransformerConfig" in str(info.value)


# --------------------------------------------------------------------- 3. method functions


def _two_input_model(method):
    a, b = keras.Input((3,)), keras.Input((2,))
    layer = FlaxLayer(rc.TwoInputs(), method=method, name="two")
    return keras.Model([a, b], layer([a, b]))


def _two_inputs():
    g = np.random.default_rng(2)
    return [g.normal(size=(4, 3)).astype("float32"), g.normal(size=(4, 2)).astype("float32")]


def test_method_function_next_to_the_module_class_loads_without_custom_objects(tmp_path):
    model = _two_input_model(rc.call_two_inputs)
    inputs = _two_inputs()
    loaded = save_load(model, tmp_path)
    assert loaded.get_layer("two")._adapter.method.fn is rc.call_two_inputs
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))


def elsewhere(module, inputs, training):
    a, b = inputs
    return module.forward(a, b, not training)


def test_method_function_elsewhere_fails_at_save_with_the_fix(tmp_path):
    model = _two_input_model(elsewhere)
    with pytest.raises(SerializationError) as info:
        model.save(tmp_path / "model.keras")
    message = str(info.value)
    assert "two" in message and "'elsewhere'" in message
    assert "@keras.saving.register_keras_serializable()" in message


@keras.saving.register_keras_serializable(package="real_code_tests")
def registered_elsewhere(module, inputs, training):
    a, b = inputs
    return module.forward(a, b, not training)


def test_registered_method_function_loads_without_custom_objects(tmp_path):
    model = _two_input_model(registered_elsewhere)
    inputs = _two_inputs()
    loaded = save_load(model, tmp_path)
    assert loaded.get_layer("two")._adapter.method.fn is registered_elsewhere
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0))


def test_decode_cache_mismatch_that_cannot_apply_still_names_paths():
    decoder = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True)
    variables = decoder.init(jax.random.key(0), jnp.ones((2, 4, 8)))
    variables = jax.tree.map(lambda a: a, dict(variables))
    cache = dict(variables["cache"])
    cache["cached_key"] = jnp.zeros((2, 4, 2, 3))  # not what the kernels produce
    variables["cache"] = cache
    with pytest.raises(ValueError, match="cache/cached_key"):
        FlaxLayer(decoder, variables=variables)(np.ones((2, 1, 8), "float32"))
