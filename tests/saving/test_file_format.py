"""What a file may hold, checked before it is used: the layer config's keys and types, the file
format's version, JaxLayer's function entries, entry tags, method entries, NNX node ids, data
flags and sizes, build configs and input specs. Each tampered golden file is refused with a
flaxlayer.SerializationError naming the config path; the untouched ones load (test_golden_files).
"""

import json
import pathlib

import golden_models  # the user's model file: loading finds its classes imported
import keras
import numpy as np
import pytest

import flaxlayer
from flaxlayer import FlaxLayer, JaxLayer, SerializationError
from helpers import layer_configs, read_keras_zip, rewrite_config, run_python_json

GOLDEN = pathlib.Path(golden_models.__file__).parent / "files"
TAG = "__flaxlayer__"


def _layer(config: dict) -> dict:
    (layer,) = [
        e for e in config["config"]["layers"] if e["class_name"] in ("FlaxLayer", "JaxLayer")
    ]
    return layer


def _tampered(tmp_path, name: str, edit) -> pathlib.Path:
    path = tmp_path / f"{name}.keras"
    rewrite_config(GOLDEN / f"{name}.keras", path, lambda config: edit(_layer(config)))
    return path


def _refused(path, *needles) -> str:
    with pytest.raises(SerializationError) as caught:
        keras.saving.load_model(path, compile=False)
    message = str(caught.value)
    for needle in needles:
        assert needle in message, message
    return message


def _predicts_as_saved(path, name: str) -> None:
    data = np.load(GOLDEN / f"{name}.npz")
    model = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(model.predict(data["x"], verbose=0), data["y"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ the format's version


@pytest.mark.parametrize(
    "layer",
    [
        lambda: FlaxLayer(golden_models.GoldenMLP()),
        lambda: JaxLayer(golden_models.golden_call, golden_models.golden_init),
    ],
)
def test_every_config_records_the_format_and_the_flaxlayer_that_wrote_it(layer):
    config = layer().get_config()
    assert config["format"] == {"version": 2, "flaxlayer": flaxlayer.__version__}


def test_a_newer_format_is_refused_with_the_flaxlayer_to_install(tmp_path):
    def newer(layer):
        layer["config"]["format"] = {"version": 3, "flaxlayer": "9.1.0"}

    message = _refused(_tampered(tmp_path, "nnx", newer), "file format 3", "reads formats 1 to 2")
    assert "pip install -U 'flaxlayer>=9.1.0'" in message


def test_a_saved_file_records_the_format_and_loads(tmp_path):
    model = keras.Sequential([keras.Input((6,)), FlaxLayer(golden_models.GoldenMLP())])
    model.save(tmp_path / "m.keras")
    config = json.loads(read_keras_zip(tmp_path / "m.keras")["config.json"])
    (layer,) = layer_configs(config)
    assert layer["format"]["version"] == 2
    x = np.ones((2, 6), "float32")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_file_without_the_format_entry_reads_as_format_1(tmp_path):
    path = _tampered(tmp_path, "linen_cnn", lambda layer: layer["config"].pop("format", None))
    _predicts_as_saved(path, "linen_cnn")


# ----------------------------------------------------------------------- the top-level keys


def _set(key, value):
    return lambda layer: layer["config"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("name", "edit", "needles"),
    [
        ("nnx", _set("extra", 1), ("'extra' is not a key flaxlayer writes for a FlaxLayer",)),
        ("nnx", lambda layer: layer["config"].pop("module"), ("has no 'module'",)),
        ("jax_layer", lambda layer: layer["config"].pop("call_fn"), ("has no 'call_fn'",)),
        ("nnx", _set("name", 3), ("config.name", "expected a string")),
        ("nnx", _set("name", "a\x00b"), ("config.name", "letters, digits")),
        ("nnx", _set("trainable", "yes"), ("config.trainable", "true or false")),
        ("linen_cnn", _set("seed", 1.5), ("config.seed",)),
        ("linen_cnn", _set("format", {"version": "2", "flaxlayer": "0.1.0"}), ("config.format",)),
        ("linen_cnn", _set("format", {"version": 0, "flaxlayer": "0.1.0"}), ("format.version",)),
        ("jax_layer", _set("module", {}), ("'module' is not a key",)),
    ],
)
def test_a_layer_config_holds_only_the_keys_and_types_flaxlayer_writes(
    tmp_path, name, edit, needles
):
    _refused(_tampered(tmp_path, name, edit), *needles)


# ------------------------------------------------------------------- JaxLayer's functions


def _function(**changes):
    def edit(layer):
        layer["config"]["call_fn"] = {**layer["config"]["call_fn"], **changes}

    return edit


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_function(class_name="GoldenCNN"), ("call_fn", "not Keras's entry of a function")),
        (_function(config="golden>no_such_function"), ("call_fn", "cannot resolve", "register")),
        (_function(config=["golden>golden_call"]), ("call_fn", "not Keras's entry")),
        (_function(extra="x"), ("call_fn", "not Keras's entry")),
        (_set("call_fn", 5), ("config.call_fn", "expected an object")),
        (_set("init_fn", "golden>golden_init"), ("config.init_fn", "expected null or an object")),
    ],
)
def test_jax_layer_functions_are_checked_then_resolved_by_keras(tmp_path, edit, needles):
    _refused(_tampered(tmp_path, "jax_layer", edit), *needles)


# -------------------------------------------------------------------- entries and methods


def _module(change):
    return lambda layer: change(layer["config"]["module"])


@pytest.mark.parametrize("tag", [["module"], {"kind": "module"}, 7])
def test_an_entry_tag_that_is_not_a_string_is_refused(tmp_path, tag):
    edit = _module(lambda module: module.__setitem__(TAG, tag))
    _refused(_tampered(tmp_path, "linen_cnn", edit), "config entry module", "not a kind of entry")


@pytest.mark.parametrize(
    "method",
    [
        {"kind": "call", "name": "tabulate"},
        {"kind": "call", "name": "__call__", "extra": 1},
        {"kind": "name", "name": "__call__", "function": None},
    ],
)
def test_a_method_entry_holds_only_what_its_kind_defines(tmp_path, method):
    _refused(_tampered(tmp_path, "linen_cnn", _set("method", method)), "config entry method")


# --------------------------------------------------------------------------------- NNX


def _nnx(path: str, key: str, value=None, delete=False):
    def change(module):
        node = module
        for part in path.split(".") if path else ():
            node = node["attributes"][part]
        if delete:
            del node[key[0]][key[1]]
        else:
            node[key] = value

    return _module(change)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_nnx("linear1", "id", 7), ("linear1.id", "count up from 0")),
        (_nnx("", "id", 1), ("module.id",)),
        (_nnx("linear1", ("data", "kernel"), delete=True), ("linear1.data", "kernel")),
        (_nnx("linear1", ("attributes", "out_features"), delete=True), ("linear1.data",)),
    ],
)
def test_nnx_node_ids_and_data_flags_are_the_ones_saving_writes(tmp_path, edit, needles):
    _refused(_tampered(tmp_path, "nnx", edit), *needles)


@pytest.mark.parametrize("value", [-1, 2.5, "8"])
def test_an_nnx_size_attribute_is_a_non_negative_integer(tmp_path, value):
    edit = _module(
        lambda m: m["attributes"]["linear1"]["attributes"].__setitem__("out_features", value)
    )
    _refused(_tampered(tmp_path, "nnx", edit), "linear1.attributes.out_features", "not a size")


# ------------------------------------------------------------- build configs, input specs


def _build_config(value):
    return lambda layer: layer.__setitem__("build_config", value)


def _input_shape(shape):
    return lambda layer: layer["build_config"]["input_spec"].__setitem__("shape", shape)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_build_config(3), ("build_config", "not the build config flaxlayer writes")),
        (_build_config({"input_spec": None, "x": 1}), ("build_config",)),
        (_input_shape([None, 2**31]), ("build_config.input_spec.shape", "[0, 2**31)")),
        (_input_shape([None, -3]), ("build_config.input_spec.shape",)),
        (_input_shape([None, 2.0]), ("build_config.input_spec.shape",)),
        (_input_shape([]), ("build_config.input_spec", "the model gives the layer")),
        (_input_shape([None, 4]), ("build_config.input_spec", "the model gives the layer")),
        (
            lambda layer: layer["build_config"]["input_spec"].__setitem__("dtype", "int8"),
            ("build_config.input_spec", "the model gives the layer"),
        ),
    ],
)
def test_a_build_config_records_inputs_the_model_gives_the_layer(tmp_path, edit, needles):
    _refused(_tampered(tmp_path, "nnx", edit), *needles)


def test_a_huge_recorded_input_allocates_nothing_before_the_weights_refute_it(tmp_path):
    """A dimension of 10**9 sizes a 20 GB kernel: the child's address space is limited to
    what it holds plus 2 GiB, so a placeholder or an initializer at that size would fail
    there with a memory error instead of the weights file's refusal."""
    path = _tampered(tmp_path, "jax_layer", _input_shape([None, 10**9]))
    model_config = json.loads(read_keras_zip(path)["config.json"])
    model_config["config"]["layers"][0]["config"]["batch_shape"] = [None, 10**9]
    rewrite_config(path, path, lambda config: config.update(model_config))
    result = run_python_json(
        f"""
        import resource
        import keras
        import golden_models, flaxlayer
        import load_probe
        held = load_probe.status_kib("VmSize") * 1024
        resource.setrlimit(resource.RLIMIT_AS, (held + 2 * 2**30, held + 2 * 2**30))
        try:
            keras.saving.load_model({str(path)!r}, compile=False)
            report({{"loaded": True}})
        except Exception as e:
            chain, seen = [], e
            while seen is not None:
                chain.append(type(seen).__name__)
                seen = seen.__cause__ or seen.__context__
            report({{"loaded": False, "chain": chain, "message": str(e)[:2000]}})
        """,
        env={"PYTHONPATH": str(GOLDEN.parent)},
    )
    assert not result["loaded"]
    # Refused by the weights check: Keras quotes its message in its own ValueError.
    assert "could not be loaded" in result["message"], result
    assert "the weights file does not match" in result["message"], result
    assert "1000000000" in result["message"] and "(4, 5)" in result["message"], result["message"]


@pytest.mark.parametrize("name", [["flax"], {"a": 1}, 3])
@pytest.mark.parametrize(
    "where",
    [
        lambda m: m["class"],
        lambda m: m["attributes"]["linear1"]["attributes"]["promote_dtype"],
        lambda m: m["attributes"]["linear1"]["attributes"]["kernel"]["class"],
    ],
    ids=["module class", "function", "variable class"],
)
def test_a_module_name_that_is_not_a_string_is_refused(tmp_path, where, name):
    edit = _module(lambda module: where(module).__setitem__("module", name))
    _refused(_tampered(tmp_path, "nnx", edit), "cannot load config entry module")
