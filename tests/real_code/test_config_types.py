"""Config objects and enum members as real Flax code types them round-trip through `.keras`.

1. Siblings: Hugging Face's mT5 encoder module declares `config: T5Config` and holds an
   `MT5Config` (both children of `PretrainedConfig`): it loads back as an `MT5Config`.
2. Loose fields: a field declared `Any` may hold a config whose class is defined beside a
   Flax module class the model saves (an lm1b-style wrapper); anything else there fails at
   save with the fix.
3. Enum members: saved by class and name, loaded by name: Gemma's NNX config holds a tuple of
   `AttentionType` members (a tuple again after loading), its blocks an `attn_type`; a Linen
   field declared `Any` holds a member of an enum defined beside its class; `nn.Dense`'s
   `precision` holds a `jax.lax.Precision`.
"""

import enum

import flax.linen as nn
import jax
import keras
import numpy as np
import pytest
from flax import nnx

import config_attack_models as cam
import gemma_modules
import gemma_transformer as gemma
import lm1b_models as lm1b
import loose_enum_models
from flaxlayer import FlaxLayer, SerializationError
from helpers import save_load

TOKENS = np.random.default_rng(0).integers(1, 32, size=(4, 6)).astype("int32")
X = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")


def _round_trip(layer, inputs, tmp_path, dtype="float32"):
    """The model saved, then loaded afresh (after clearing Keras's session): the loaded model,
    and the predictions of both."""
    model = keras.Sequential([keras.Input(inputs.shape[1:], dtype=dtype), layer])
    expected = model.predict(inputs, verbose=0)
    keras.backend.clear_session()
    loaded = save_load(model, tmp_path)
    return loaded, expected, loaded.predict(inputs, verbose=0)


# ----------------------------------------------------------------------------- 1. siblings


def test_mt5_config_in_a_t5_config_field_loads_back_as_mt5(tmp_path):
    mt5 = pytest.importorskip("mt5_models", exc_type=ImportError)
    with mt5.jax_clip_keywords():
        hf_model = mt5.tiny_mt5_encoder()
        layer = FlaxLayer(
            hf_model.module, method=mt5.mt5_encode, variables={"params": hf_model.params}
        )
        loaded, expected, got = _round_trip(layer, TOKENS[:, :5], tmp_path, dtype="int32")
    config = loaded.layers[0].module.config
    assert type(config).__name__ == "MT5Config"
    assert type(config) is type(hf_model.module.config)
    assert config.to_dict() == hf_model.module.config.to_dict()
    np.testing.assert_allclose(got, expected, atol=1e-5)


# -------------------------------------------------------------------------- 2. loose fields


def test_config_beside_the_module_class_round_trips_in_a_loose_field(tmp_path):
    config = lm1b.TransformerConfig(vocab_size=32, emb_dim=8, num_layers=2)
    loaded, expected, got = _round_trip(
        FlaxLayer(lm1b.Wrapper(config)), TOKENS, tmp_path, dtype="int32"
    )
    assert loaded.layers[0].module.config == config
    assert type(loaded.layers[0].module.config) is lm1b.TransformerConfig
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_config_beside_no_saved_module_class_fails_at_save_with_the_fix(tmp_path):
    module = cam.StrayWrapper(lm1b.TransformerConfig())
    model = keras.Sequential([keras.Input((6,), dtype="int32"), FlaxLayer(module, name="stray")])
    with pytest.raises(SerializationError) as info:
        model.save(tmp_path / "model.keras")
    message = str(info.value)
    assert "stray" in message and "`config`" in message and "StrayWrapper" in message
    assert "TransformerConfig" in message and "lm1b_models" in message  # what was given
    assert "declares" in message and "module of a Flax module class" in message  # expected
    assert "`config: TransformerConfig`" in message  # the fix


# ------------------------------------------------------------------------------- 3. enums


def test_gemma_config_with_a_tuple_of_enum_members_round_trips(tmp_path):
    config = gemma.TransformerConfig.tiny()
    module = gemma.Transformer(config, rngs=nnx.Rngs(0))
    loaded, expected, got = _round_trip(FlaxLayer(module), TOKENS, tmp_path, dtype="int32")
    rebuilt = loaded.layers[0].module
    assert rebuilt.config == config
    assert type(rebuilt.config.attention_types) is tuple
    assert rebuilt.config.attention_types[0] is gemma_modules.AttentionType.LOCAL_SLIDING
    assert rebuilt.config.query_pre_attn_norm is config.query_pre_attn_norm
    assert [layer.attn.attn_type for layer in rebuilt.layers] == list(config.attention_types)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_enum_member_beside_the_module_class_round_trips_in_a_loose_field(tmp_path):
    module = loose_enum_models.ModeHolder(mode=loose_enum_models.Mode.SLOW)
    loaded, expected, got = _round_trip(FlaxLayer(module), X, tmp_path)
    assert loaded.layers[0].module.mode is loose_enum_models.Mode.SLOW
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_enum_member_named_inside_a_union_annotation_round_trips(tmp_path):
    """nn.Dense declares `precision: PrecisionLike` (None, str, Precision or tuples of them)."""
    module = nn.Dense(2, precision=jax.lax.Precision.HIGHEST)
    loaded, expected, got = _round_trip(FlaxLayer(module), X, tmp_path)
    assert loaded.layers[0].module.precision is jax.lax.Precision.HIGHEST
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_enum_member_beside_no_saved_module_class_fails_at_save_with_the_fix(tmp_path):
    module = cam.StrayModeHolder(mode=loose_enum_models.Mode.SLOW)
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module, name="stray_mode")])
    with pytest.raises(SerializationError) as info:
        model.save(tmp_path / "model.keras")
    message = str(info.value)
    assert "stray_mode" in message and "`mode`" in message and "StrayModeHolder" in message
    assert "enum member of class Mode" in message and "`mode: Mode`" in message


class Width(enum.IntEnum):
    TWO = 2


def test_int_enum_in_a_field_that_does_not_name_it_stays_a_plain_int(tmp_path):
    """As before: an IntEnum member where no annotation names its class saves as its int."""
    loaded, _, _ = _round_trip(FlaxLayer(nn.Dense(features=Width.TWO)), X, tmp_path)
    features = loaded.layers[0].module.features
    assert type(features) is int and features == 2
