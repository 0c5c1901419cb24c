"""What a module's saved config captures, and what it refuses.

Dataclass fields are captured recursively (submodules, containers, scalars, dtypes,
flax/jax/numpy functions, initializers, partials, module classes) and come back equal after
model.save / load_model; a class with its own get_config/from_config is saved through them.
A field that cannot be captured fails at save time, naming the class, the field and
the fix.
"""

import functools
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import serialization_models as sm
from flaxlayer import FlaxLayer, SerializationError
from flaxlayer._linen import LinenCodec
from flaxlayer._saving import TAG, Decoder, Encoder, KindCodec, schema

INITS = {
    "variance_scaling": jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
    "normal": jax.nn.initializers.normal(0.02),
    "constant": jax.nn.initializers.constant(0.1),
    "zeros": jax.nn.initializers.zeros,
    "flax_lecun_normal": nn.initializers.lecun_normal(),
    "flax_uniform": nn.initializers.uniform(scale=0.5),
    "he_normal_batch": jax.nn.initializers.he_normal(in_axis=0, out_axis=1, batch_axis=()),
}


def _kitchen():
    return sm.Kitchen(
        block=sm.Block(features=5, act=jax.nn.gelu, kernel_init=INITS["variance_scaling"]),
        dense=nn.Dense(
            4,
            kernel_init=INITS["normal"],
            bias_init=INITS["constant"],
            dtype=np.float32,
        ),
        blocks=(
            sm.Block(features=4, act=nn.relu, kernel_init=INITS["zeros"]),
            sm.Block(features=4, act=jnp.tanh),
        ),
        sizes=(1, 2, (3, 4)),
        widths=[5, 6, [7]],
        table={"a": 1, "b": (2, 3), "c": [None, True], 3: "three"},
        rate=0.25,
        big=math.inf,
        small_scalar=np.float32(0.5),
        label="hello",
        flag=True,
        nothing=None,
        storage_dtype=jnp.bfloat16,
        param_dtype=np.float32,
        acts=(nn.relu, jax.nn.gelu, jnp.tanh),
        np_act=np.tanh,
        partial_act=functools.partial(nn.leaky_relu, negative_slope=0.2),
        inits=dict(INITS),
        norm_cls=nn.LayerNorm,
    )


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory):
    """(original module, loaded module, original predictions, loaded predictions)."""
    keras.utils.set_random_seed(0)
    module = _kitchen()
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = tmp_path_factory.mktemp("kitchen") / "kitchen.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    return module, loaded.layers[0].module, expected, loaded.predict(x, verbose=0)


def _same_init(a, b, shape=(4, 5), dtype=jnp.float32):
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        np.testing.assert_array_equal(
            np.asarray(a(key, shape, dtype)), np.asarray(b(key, shape, dtype))
        )


def test_kitchen_predictions_equal(kitchen):
    _, loaded, expected, got = kitchen
    assert type(loaded) is sm.Kitchen
    np.testing.assert_array_equal(got, expected)


def test_nested_submodule_fields_load_with_their_fields(kitchen):
    _, loaded, _, _ = kitchen
    assert type(loaded.block) is sm.Block
    assert loaded.block.features == 5
    assert type(loaded.dense) is nn.Dense
    assert loaded.dense.features == 4
    assert isinstance(loaded.blocks, tuple)
    assert [type(b) for b in loaded.blocks] == [sm.Block, sm.Block]
    assert [b.features for b in loaded.blocks] == [4, 4]
    # A field left at its default comes back as the default.
    assert loaded.blocks[1].kernel_init is sm.Block.kernel_init


def test_tuple_fields_load_as_nested_tuples(kitchen):
    _, loaded, _, _ = kitchen
    assert loaded.sizes == (1, 2, (3, 4))
    assert type(loaded.sizes) is tuple and type(loaded.sizes[2]) is tuple
    assert loaded.widths == [5, 6, [7]]
    assert type(loaded.widths) is list and type(loaded.widths[2]) is list
    assert loaded.table == {"a": 1, "b": (2, 3), "c": [None, True], 3: "three"}
    assert type(loaded.table) is dict
    assert type(loaded.table["b"]) is tuple and type(loaded.table["c"]) is list


def test_scalar_fields_keep_their_value_and_type(kitchen):
    _, loaded, _, _ = kitchen
    assert loaded.rate == 0.25 and type(loaded.rate) is float
    assert loaded.big == math.inf
    assert loaded.small_scalar == np.float32(0.5) and type(loaded.small_scalar) is np.float32
    assert loaded.label == "hello"
    assert loaded.flag is True
    assert loaded.nothing is None  # not the default "something"


def test_dtype_fields_load_as_the_same_dtypes(kitchen):
    _, loaded, _, _ = kitchen
    assert jnp.dtype(loaded.storage_dtype) == jnp.dtype(jnp.bfloat16)
    assert jnp.dtype(loaded.param_dtype) == jnp.dtype(np.float32)
    assert jnp.dtype(loaded.dense.dtype) == jnp.dtype(np.float32)


def test_function_fields_load_as_the_same_functions(kitchen):
    _, loaded, _, _ = kitchen
    assert loaded.block.act is jax.nn.gelu
    assert loaded.blocks[0].act is nn.relu
    assert loaded.blocks[1].act is jnp.tanh
    assert loaded.acts == (nn.relu, jax.nn.gelu, jnp.tanh)
    assert all(a is b for a, b in zip(loaded.acts, (nn.relu, jax.nn.gelu, jnp.tanh), strict=True))
    assert loaded.np_act is np.tanh


def test_partial_of_flax_function(kitchen):
    _, loaded, _, _ = kitchen
    assert isinstance(loaded.partial_act, functools.partial)
    assert loaded.partial_act.func is nn.leaky_relu
    assert loaded.partial_act.args == ()
    assert loaded.partial_act.keywords == {"negative_slope": 0.2}


def test_module_class_field_loads_as_the_same_class(kitchen):
    _, loaded, _, _ = kitchen
    assert loaded.norm_cls is nn.LayerNorm


def test_initializers_produce_the_same_arrays(kitchen):
    original, loaded, _, _ = kitchen
    assert sorted(loaded.inits) == sorted(INITS)
    for name, init in INITS.items():
        _same_init(loaded.inits[name], init)
        _same_init(loaded.inits[name], original.inits[name])
    _same_init(loaded.block.kernel_init, INITS["variance_scaling"])
    _same_init(loaded.dense.kernel_init, INITS["normal"])
    _same_init(loaded.dense.bias_init, INITS["constant"], shape=(4,))
    _same_init(loaded.blocks[0].kernel_init, INITS["zeros"])
    # Non-trivial: the configured initializers do not just give the defaults.
    key = jax.random.key(0)
    assert float(jnp.std(loaded.inits["normal"](key, (64, 64)))) < 0.05
    np.testing.assert_array_equal(np.asarray(loaded.inits["constant"](key, (2,))), np.float32(0.1))


def test_kitchen_config_is_json_and_stable():
    layer = FlaxLayer(_kitchen())
    config = layer.get_config()
    text = json.dumps(config)
    again = FlaxLayer.from_config(json.loads(text))
    assert json.dumps(again.get_config()) == text


def test_class_with_own_get_config_is_honoured(tmp_path):
    keras.utils.set_random_seed(0)
    module = sm.CustomConfigDense(features=3, scale=sm.Scale(2.0))
    model = keras.Sequential([keras.Input((4,)), FlaxLayer(module)])
    x = np.ones((2, 4), "float32")
    expected = model.predict(x, verbose=0)
    path = tmp_path / "custom.keras"
    model.save(path)

    sm.FROM_CONFIG_CALLS.clear()
    loaded = keras.saving.load_model(path)

    assert sm.FROM_CONFIG_CALLS == [{"features": 3, "scale_value": 2.0}]
    assert loaded.layers[0].module.scale == sm.Scale(2.0)
    assert loaded.layers[0].module.features == 3
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


def test_partial_of_module_class_round_trips(tmp_path):
    """A common Flax idiom; the first version saved it but refused the class when loading."""
    keras.utils.set_random_seed(0)
    module = sm.PartialNorm(norm=functools.partial(nn.LayerNorm, epsilon=1e-2))
    model = keras.Sequential([keras.Input((4,)), FlaxLayer(module)])
    x = np.ones((2, 4), "float32")
    expected = model.predict(x, verbose=0)
    path = tmp_path / "partial.keras"
    model.save(path)

    loaded = keras.saving.load_model(path)

    norm = loaded.layers[0].module.norm
    assert norm.func is nn.LayerNorm and norm.keywords == {"epsilon": 1e-2}
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


# ------------------------------------------------------------- fields that cannot be captured


def _closure():
    scale = 2.0

    def scaled(x):
        return x * scale

    return scaled


class _Opaque:
    pass


UNSAVEABLE = {
    "lambda": lambda x: x,
    "closure": _closure(),
    "object": _Opaque(),
    "nested-lambda": (1, [lambda x: x]),
}


def _assert_save_error(message, cls_name, field):
    assert cls_name in message
    assert field in message
    assert "register_keras_serializable" in message
    assert "get_config" in message


@pytest.mark.parametrize("kind", sorted(UNSAVEABLE))
def test_unsaveable_field_fails_at_save(kind, tmp_path):
    layer = FlaxLayer(sm.HoldsAnything(thing=UNSAVEABLE[kind]))
    model = keras.Sequential([keras.Input((3,)), layer])
    # The layer itself works: only saving fails.
    model.predict(np.ones((1, 3), "float32"), verbose=0)

    with pytest.raises(ValueError) as info:
        layer.get_config()
    _assert_save_error(str(info.value), "HoldsAnything", "thing")

    with pytest.raises(ValueError) as info:
        model.save(tmp_path / "model.keras")
    _assert_save_error(str(info.value), "HoldsAnything", "thing")


def test_unsaveable_field_of_nested_module_names_that_module():
    layer = FlaxLayer(sm.Wrapper(inner=sm.HoldsAnything(thing=_Opaque())))
    with pytest.raises(ValueError) as info:
        layer.get_config()
    _assert_save_error(str(info.value), "HoldsAnything", "thing")


def test_unsaveable_field_reason_is_specific():
    with pytest.raises(ValueError, match="lambda"):
        FlaxLayer(sm.HoldsAnything(thing=UNSAVEABLE["lambda"])).get_config()
    with pytest.raises(ValueError, match="closure"):
        FlaxLayer(sm.HoldsAnything(thing=UNSAVEABLE["closure"])).get_config()
    with pytest.raises(ValueError, match="_Opaque"):
        FlaxLayer(sm.HoldsAnything(thing=UNSAVEABLE["object"])).get_config()


def test_module_class_not_at_top_level_fails_at_save(tmp_path):
    class LocalModule(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            return nn.Dense(2)(inputs)

    model = keras.Sequential([keras.Input((3,)), FlaxLayer(LocalModule())])
    with pytest.raises(ValueError, match="top level") as info:
        model.save(tmp_path / "model.keras")
    assert "LocalModule" in str(info.value)


def test_local_module_class_as_field_fails_at_save():
    class LocalNorm(nn.LayerNorm):
        pass

    with pytest.raises(ValueError, match="top level") as info:
        FlaxLayer(sm.WithLocalClass(norm_cls=LocalNorm)).get_config()
    assert "LocalNorm" in str(info.value)
    assert "norm_cls" in str(info.value)


def test_registered_function_field_round_trips(tmp_path):
    """The fix the error suggests works: a registered function is saved and found again."""
    fn = keras.saving.register_keras_serializable(package="flaxlayer_sertest_cfg")(_closure())
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(sm.Activated(act=fn))])
    x = np.ones((2, 3), "float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.layers[0].module.act is fn
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


def test_flax_sequential_of_modules_and_functions_round_trips(tmp_path):
    """A Flax container given as a field: a list mixing submodules and a flax function."""
    keras.utils.set_random_seed(0)
    body = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2, use_bias=False)])
    model = keras.Sequential([keras.Input((4,)), FlaxLayer(sm.Wrapper(inner=body))])
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")

    loaded = keras.saving.load_model(tmp_path / "model.keras")

    inner = loaded.layers[0].module.inner
    assert type(inner) is nn.Sequential
    assert [type(layer) for layer in inner.layers[::2]] == [nn.Dense, nn.Dense]
    assert inner.layers[1] is nn.relu
    assert inner.layers[2].use_bias is False
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


# -------------------------------------------------- serialization asks the module kinds' codecs


class Affine:
    """Not a Flax module: a kind that only a codec given to the Encoder/Decoder can write."""

    def __init__(self, scale: float, shift: float):
        self.scale, self.shift = scale, shift


class AffineCodec(KindCodec):
    entries = schema(("affine", {"scale", "shift"}, ()))
    class_bases = ()
    module_base = Affine

    @classmethod
    def encodes(cls, value):
        return isinstance(value, Affine)

    def encode(self, value, where):
        return {TAG: "affine", "scale": value.scale, "shift": value.shift}

    def check(self, data, path, depth, declared):
        if not all(isinstance(data[k], float) for k in ("scale", "shift")):
            raise self.coder.fail(path, "scale and shift are floats.")

    def decode(self, data, path):
        return Affine(data["scale"], data["shift"])


class HoldsAffine(nn.Module):
    transform: Any = None

    def __call__(self, inputs):
        return inputs * self.transform.scale + self.transform.shift


def test_a_module_kind_codec_extends_what_is_saved_without_touching_serialization():
    module = HoldsAffine(Affine(2.0, 1.0))
    with pytest.raises(SerializationError, match="objects of type Affine are not saved"):
        Encoder("test", (LinenCodec,)).module(module)
    entry = json.loads(json.dumps(Encoder("test", (LinenCodec, AffineCodec)).module(module)))
    assert entry["fields"]["transform"] == {TAG: "affine", "scale": 2.0, "shift": 1.0}
    back = Decoder("test", (LinenCodec, AffineCodec), safe=True).decode_module(entry)
    assert isinstance(back, HoldsAffine)
    assert (back.transform.scale, back.transform.shift) == (2.0, 1.0)
    entry["fields"]["transform"]["scale"] = "2"
    with pytest.raises(SerializationError, match="scale and shift are floats"):
        Decoder("test", (LinenCodec, AffineCodec), safe=True).decode_module(entry)
    with pytest.raises(SerializationError, match="'affine' is not a kind of entry"):
        Decoder("test", (LinenCodec,), safe=True).decode_module(entry)
