"""Tampered `.keras` files load safely; bad files fail clearly.

With the default safe_mode, a .keras file whose config names `os.system`,
`builtins.exec`, a non-Flax class, or a module not yet imported (as the module class or as a
function field) is refused with an error naming the reference; nothing is called and nothing
is imported. Initializer factories are limited to the JAX/Flax ones. With safe_mode=False a
class in a not-yet-imported module is imported.
Truncated or corrupt files, a missing field and mismatched weight shapes give clear
errors and load nothing partially.
"""

import contextlib
import os
import subprocess
import sys
import uuid

import jax
import keras
import numpy as np
import pytest

import serialization_models as sm
from flaxlayer import FlaxLayer
from helpers import only_layer_config, rewrite_config

TAG = "__flaxlayer__"
X = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")

MODULE_SOURCE = """
import pathlib

pathlib.Path({marker!r}).write_text("imported")

import flax.linen as nn


class SmallDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(self.features)(inputs)


def evil(x):
    pathlib.Path({marker!r}).write_text("called")
    return x
"""


def _save(tmp_path, module, name="model.keras"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module)])
    path = tmp_path / name
    model.save(path)
    return model, path


def _tamper(src, tmp_path, edit_module):
    """A copy of `src` whose FlaxLayer module config went through `edit_module`."""
    dst = tmp_path / f"tampered-{uuid.uuid4().hex[:8]}.keras"
    rewrite_config(src, dst, lambda config: edit_module(only_layer_config(config)["module"]))
    return dst


@pytest.fixture
def recorder(monkeypatch):
    """Replaces os.system and subprocess.call with functions that record their calls."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return 0

    monkeypatch.setattr(os, "system", fake)
    monkeypatch.setattr(subprocess, "call", fake)
    return calls


@pytest.fixture
def unimported(tmp_path, monkeypatch):
    """A module file on sys.path that nobody imported; importing it writes a marker file."""
    name = f"flaxlayer_sertest_unimported_{uuid.uuid4().hex[:10]}"
    directory = tmp_path / "pkgdir"
    directory.mkdir()
    marker = tmp_path / f"{name}.marker"
    (directory / f"{name}.py").write_text(MODULE_SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(directory))
    yield name, marker
    sys.modules.pop(name, None)


def _assert_untouched(unimported_module):
    name, marker = unimported_module
    assert name not in sys.modules
    assert not marker.exists()


# ---------------------------------------------------------------- tampered class references


@pytest.mark.parametrize(
    ("module_name", "qualname"),
    [("os", "system"), ("builtins", "exec"), ("subprocess", "Popen"), ("builtins", "eval")],
)
def test_module_class_pointed_at_a_non_flax_callable_is_refused(
    module_name, qualname, tmp_path, recorder
):
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    marker = tmp_path / "popen-ran"

    def edit(module):
        module["class"] = {"module": module_name, "qualname": qualname}
        module["fields"] = {"args": f"touch {marker}"}

    tampered = _tamper(path, tmp_path, edit)

    with pytest.raises(ValueError, match="not a Flax module class") as info:
        keras.saving.load_model(tampered)
    assert f"{module_name}.{qualname}" in str(info.value)
    assert recorder == []
    assert not marker.exists()


def test_module_class_in_unimported_module_is_refused(tmp_path, unimported, recorder):
    name, _ = unimported
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    tampered = _tamper(
        path, tmp_path, lambda m: m.update({"class": {"module": name, "qualname": "SmallDense"}})
    )

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)

    message = str(info.value)
    assert name in message
    assert "not imported" in message and "safe_mode=False" in message
    _assert_untouched(unimported)
    assert recorder == []


def test_unimported_module_class_loads_with_safe_mode_off(tmp_path, unimported):
    name, marker = unimported
    model, path = _save(tmp_path, sm.SmallDense(features=4))
    tampered = _tamper(
        path, tmp_path, lambda m: m.update({"class": {"module": name, "qualname": "SmallDense"}})
    )

    loaded = keras.saving.load_model(tampered, safe_mode=False)

    assert name in sys.modules
    assert marker.read_text() == "imported"
    module = loaded.layers[0].module
    assert type(module).__module__ == name and type(module).__name__ == "SmallDense"
    assert module.features == 4
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


def test_class_lookup_runs_no_module_getattr_hook(tmp_path, monkeypatch):
    name = f"flaxlayer_sertest_hooked_{uuid.uuid4().hex[:10]}"
    directory = tmp_path / "hooked"
    directory.mkdir()
    (directory / f"{name}.py").write_text(
        "CALLS = []\n\n\ndef __getattr__(attr):\n"
        "    CALLS.append(attr)\n"
        "    raise AttributeError(attr)\n"
    )
    monkeypatch.syspath_prepend(str(directory))
    hooked = __import__(name)
    try:
        _, path = _save(tmp_path, sm.SmallDense(features=4))
        tampered = _tamper(
            path, tmp_path, lambda m: m.update({"class": {"module": name, "qualname": "Ghost"}})
        )
        with pytest.raises(ValueError, match="Ghost"):
            keras.saving.load_model(tampered)
        assert hooked.CALLS == []
    finally:
        sys.modules.pop(name, None)


# ------------------------------------------------------------- tampered function references


def _function(module_name, qualname):
    return {TAG: "function", "module": module_name, "qualname": qualname}


@pytest.mark.parametrize(
    ("module_name", "qualname"),
    [
        ("os", "system"),
        ("subprocess", "call"),
        ("builtins", "exec"),
        ("importlib", "import_module"),
        # Reached through a trusted package or a class's module, which imported them: a lookup
        # must not pass from one module into another (found in the first version).
        ("jax._src.config", "os.system"),
        ("jax.version", "subprocess.call"),
        ("serialization_models", "keras.saving.load_model"),
        # File I/O and callbacks of the trusted packages.
        ("jax.numpy", "load"),
        ("jax.numpy", "save"),
        ("numpy", "savetxt"),
        ("flax.linen", "tabulate"),
        ("jax.debug", "callback"),
    ],
    ids=lambda v: v,
)
def test_function_field_pointed_at_a_dangerous_function_is_refused(
    module_name, qualname, tmp_path, recorder
):
    _, path = _save(tmp_path, sm.Activated(act=jax.nn.gelu))

    def edit(module):
        module["fields"]["act"] = _function(module_name, qualname)

    tampered = _tamper(path, tmp_path, edit)

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)
    assert f"{module_name}.{qualname}" in str(info.value)
    assert recorder == []


CLASS_MODULE_SOURCE = """
from os import system
from subprocess import call

import flax.linen as nn


def own_activation(x):
    return x * 2.0


class Activated(nn.Module):
    features: int = 3
    act: object = None

    @nn.compact
    def __call__(self, inputs):
        return self.act(nn.Dense(self.features)(inputs))
"""


@pytest.fixture
def class_module(tmp_path, monkeypatch):
    """An imported module with a Flax class, its own function, and imported os/subprocess ones."""
    name = f"flaxlayer_sertest_classmod_{uuid.uuid4().hex[:10]}"
    directory = tmp_path / "classmod"
    directory.mkdir()
    (directory / f"{name}.py").write_text(CLASS_MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(directory))
    module = __import__(name)
    yield module
    sys.modules.pop(name, None)


@pytest.mark.parametrize("qualname", ["system", "call"])
def test_function_imported_into_a_class_module_is_refused(
    qualname, class_module, tmp_path, recorder
):
    """Functions of a Flax class's module are trusted only if defined there."""
    name = class_module.__name__
    _, path = _save(tmp_path, class_module.Activated(act=class_module.own_activation))

    def edit(module):
        assert module["class"] == {"module": name, "qualname": "Activated"}
        assert module["fields"]["act"]["qualname"] == "own_activation"
        module["fields"]["act"] = _function(name, qualname)

    tampered = _tamper(path, tmp_path, edit)

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)
    assert f"{name}.{qualname}" in str(info.value)
    assert recorder == []


def test_function_defined_in_a_class_module_loads_safely(class_module, tmp_path):
    model, path = _save(tmp_path, class_module.Activated(act=class_module.own_activation))
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].module.act is class_module.own_activation
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


def test_function_field_in_unimported_module_is_refused(tmp_path, unimported):
    name, _ = unimported
    _, path = _save(tmp_path, sm.Activated(act=jax.nn.gelu))

    def edit(module):
        module["fields"]["act"] = _function(name, "evil")

    tampered = _tamper(path, tmp_path, edit)

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)
    assert f"{name}.evil" in str(info.value)
    _assert_untouched(unimported)


def test_partial_of_dangerous_function_never_runs(tmp_path, recorder):
    """A field the module calls with no arguments would run `os.system("echo pwned")`.

    The first version accepted "jax._src.config" + "os.system" and ran the command 6 times
    while the model was built.
    """
    _, path = _save(tmp_path, sm.Offset())  # the default partial is not written

    def edit(module):
        module["fields"]["make_offset"] = {
            TAG: "partial",
            "func": _function("jax._src.config", "os.system"),
            "args": ["echo pwned"],
            "keywords": {},
        }

    tampered = _tamper(path, tmp_path, edit)
    with contextlib.suppress(Exception):  # whether it fails later does not matter here
        keras.saving.load_model(tampered)
    assert recorder == []


def test_safe_loading_writes_no_files(tmp_path):
    """The first version trusted every numpy function: loading truncated `victim` (savetxt
    opens its file before failing on the tracer)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    _, path = _save(tmp_path, sm.Activated(act=jax.nn.gelu))

    def edit(module):
        module["fields"]["act"] = {
            TAG: "partial",
            "func": _function("numpy", "savetxt"),
            "args": [str(victim)],
            "keywords": {},
        }

    tampered = _tamper(path, tmp_path, edit)
    with pytest.raises(ValueError, match=r"numpy\.savetxt"):
        keras.saving.load_model(tampered)
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------- initializer factories


@pytest.mark.parametrize(
    ("module_name", "qualname"),
    [("numpy", "save"), ("os", "system"), ("builtins", "exec")],
)
def test_initializer_factory_pointed_at_a_non_initializer_is_refused(
    module_name, qualname, tmp_path, recorder
):
    _, path = _save(tmp_path, sm.Block(features=2, kernel_init=jax.nn.initializers.normal(0.02)))
    target = tmp_path / "saved-by-numpy"

    def edit(module):
        init = module["fields"]["kernel_init"]
        assert init[TAG] == "factory"
        init["factory"] = {"module": module_name, "qualname": qualname}
        init["kwargs"] = {"file": str(target), "arr": [1, 2, 3]}

    tampered = _tamper(path, tmp_path, edit)

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)
    assert f"{module_name}.{qualname}" in str(info.value)
    assert not target.exists() and not (tmp_path / "saved-by-numpy.npy").exists()
    assert recorder == []


def test_initializer_factory_untampered_loads(tmp_path):
    """Control for the tests above: the same file without tampering loads in safe mode."""
    model, path = _save(
        tmp_path, sm.Block(features=2, kernel_init=jax.nn.initializers.normal(0.02))
    )
    tampered = _tamper(path, tmp_path, lambda module: None)
    loaded = keras.saving.load_model(tampered)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


# ---------------------------------------------------- truncated, corrupt and mismatched files


def test_truncated_file_fails(tmp_path):
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - Keras's own error
        keras.saving.load_model(truncated)


def test_corrupt_file_fails(tmp_path):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(Exception):  # noqa: B017 - Keras's own error
        keras.saving.load_model(corrupt)


def test_missing_required_field_names_it(tmp_path):
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    tampered = _tamper(path, tmp_path, lambda module: module["fields"].pop("features"))
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)
    assert "features" in str(info.value)
    assert "SmallDense" in str(info.value)


def test_unknown_field_is_refused_naming_it(tmp_path):
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    tampered = _tamper(path, tmp_path, lambda module: module["fields"].update(bogus=1))
    with pytest.raises(ValueError, match="bogus"):
        keras.saving.load_model(tampered)


def test_mismatched_weight_shapes_name_path_and_shapes(tmp_path):
    _, path = _save(tmp_path, sm.SmallDense(features=4))
    tampered = _tamper(path, tmp_path, lambda module: module["fields"].update(features=5))

    with pytest.raises(ValueError) as info:
        keras.saving.load_model(tampered)

    message = str(info.value)
    assert "params/Dense_0/kernel" in message
    assert "(3, 5)" in message and "(3, 4)" in message
    assert "params/Dense_0/bias" in message
    assert "(5,)" in message and "(4,)" in message


def test_mismatched_weights_load_nothing(tmp_path):
    keras.utils.set_random_seed(0)
    source = keras.Sequential([keras.Input((5,)), FlaxLayer(sm.BatchNormNet(hidden=8, out=3))])
    weights = tmp_path / "source.weights.h5"
    source.save_weights(weights)

    keras.utils.set_random_seed(1)
    target = keras.Sequential([keras.Input((5,)), FlaxLayer(sm.BatchNormNet(hidden=8, out=4))])
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in target.layers[0].weights]
    # Only Dense_1 differs; the variables before it in order (BatchNorm_0, Dense_0) match.
    matching = [
        v.path for v in target.layers[0].weights if "Dense_1" not in v.path and "seed" not in v.path
    ]
    assert len(matching) >= 4

    with pytest.raises(ValueError, match="Dense_1/kernel"):
        target.load_weights(weights)

    after = [np.array(keras.ops.convert_to_numpy(v)) for v in target.layers[0].weights]
    for v, b, a in zip(target.layers[0].weights, before, after, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{v.path} was loaded partially")


def test_layer_load_own_variables_is_all_or_nothing():
    keras.utils.set_random_seed(0)
    layer = FlaxLayer(sm.SmallDense(features=4))
    layer.build((None, 3))
    variables = layer.trainable_variables  # SmallDense has no state
    assert len(variables) == 2
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
    # The first variable matches (and would change); a later one does not.
    store = {str(i): np.full(tuple(v.shape), 7.0, "float32") for i, v in enumerate(variables)}
    store[str(len(variables) - 1)] = np.zeros((9, 9), "float32")

    with pytest.raises(ValueError, match=r"\(9, 9\)"):
        layer.load_own_variables(store)

    for v, b in zip(variables, before, strict=True):
        np.testing.assert_array_equal(np.array(keras.ops.convert_to_numpy(v)), b)


def test_wrong_number_of_variables_is_refused():
    layer = FlaxLayer(sm.SmallDense(features=4))
    layer.build((None, 3))
    with pytest.raises(ValueError, match="holds 1 variables"):
        layer.load_own_variables({"0": np.zeros((4,), "float32")})
