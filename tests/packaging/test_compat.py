"""Private names of Keras and JAX live in `flaxlayer/_compat.py` only, and each still exists.

An upgrade that moves one fails here by name (not as a feature silently changing), and no
other module imports a private name behind `_compat`'s back. Likewise every branch on the Keras
backend lives in `flaxlayer/_bridges/`.
"""

import importlib
import re
from pathlib import Path

import keras
import numpy as np
import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "flaxlayer"

# (importable module, dotted attribute path) of each private name `_compat` relies on.
PRIVATE_NAMES = [
    ("keras.src.backend.common", "global_state.get_global_attribute"),
    ("keras.src.backend.common", "global_state.set_global_attribute"),
    ("keras.src.backend.common.name_scope", "current_path"),
    ("keras.src.backend.common.stateless_scope", "in_stateless_scope"),
    ("keras.src.saving.saving_lib", "_walk_saveable"),
    ("keras.src.saving.serialization_lib", "in_safe_mode"),
    ("flax.nnx.pytreelib", "PytreeState"),
    ("flax.nnx.graphlib", "HashableMapping"),
    ("jax._src.xla_bridge", "get_backend"),
    ("jax._src.xla_bridge", "backends_are_initialized"),
    ("jax._src.export._export", "_module_to_bytecode"),
    ("jax._src.interpreters.mlir", "module_to_bytecode"),
    ("jax._src.lib", "_jax.mlir.serialize_portable_artifact"),
    ("jax._src.lib.mlir", "ir.Module.parse"),
    ("jax._src.lib.mlir", "passmanager.PassManager.parse"),
    ("jax._src.lib.mlir.dialects", "hlo.get_smaller_version"),
    ("jax._src.lib.mlir.dialects", "hlo.get_version_from_compatibility_requirement"),
    ("jax._src.lib.mlir.dialects", "hlo.register_stablehlo_passes"),
    ("jax._src.interpreters.partial_eval", "dce_jaxpr"),
    ("jax._src.lib", "_jax.buffer_to_dlpack_managed_tensor"),
    ("keras.src.layers.layer", "Layer._untrack_variable"),
    ("keras.src.backend.common.variables", "Variable._deferred_initialize"),
    ("torch", "_C._from_dlpack"),
    ("tensorflow.python.eager.record", "should_record_backprop"),
    ("tensorflow.python.eager.record", "could_possibly_record"),
    (
        "tensorflow.python.eager.polymorphic_function.concrete_function",
        "ConcreteFunction._call_flat",
    ),
]
PRIVATE_IMPORT = re.compile(
    r"^\s*(?:from|import)\s+(?:keras\.src|jax\._src|flax\.nnx\.(?:graphlib|pytreelib))\b"
    r"|^\s*from\s+flax\.nnx\s+import\s+.*\b(?:graphlib|pytreelib)\b",
    re.M,
)
BACKEND_BRANCH = re.compile(r"keras\.backend\.backend\(\)")


def sources(exclude) -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if not exclude(p.relative_to(SRC))]


def only_in_jax_session():
    if keras.backend.backend() != "jax":
        pytest.skip("a check of the source, done once in the jax session")


@pytest.mark.parametrize(("module", "name"), PRIVATE_NAMES, ids=lambda v: str(v))
def test_private_name_still_exists(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        assert hasattr(obj, part), f"{module}.{name} is gone: update flaxlayer/_compat.py"
        obj = getattr(obj, part)


def test_nnx_variables_keep_their_value_in_raw_value():
    from flax import nnx

    from flaxlayer._compat import replace_variable_value

    assert "_raw_value" in nnx.Variable.__slots__, "update _compat.replace_variable_value"
    variable = nnx.Param(1.0)
    replace_variable_value(variable, 2.0)
    assert variable.get_value() == 2.0


def test_layers_keep_their_variable_tracker():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    for name in ("lock", "unlock", "locked"):
        assert hasattr(layer._tracker, name), "update _compat.unlocked_tracker"
    assert callable(layer._untrack_variable), "update _compat.untrack_variable"
    tracked = layer._trainable_variables + layer._non_trainable_variables
    assert [v.path for v in tracked] == ["dense/kernel", "dense/bias"], "update tracked_variables"


def test_compat_imports_every_private_name_it_lists():
    import flaxlayer._compat as compat

    for name in compat.__all__:
        assert hasattr(compat, name), name


def test_no_private_import_outside_compat():
    only_in_jax_session()
    offenders = [
        f"{path.relative_to(SRC)}: {m.group(0).strip()}"
        for path in sources(lambda rel: rel.name == "_compat.py")
        for m in PRIVATE_IMPORT.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "private imports outside _compat.py:\n" + "\n".join(offenders)


def test_no_backend_branch_outside_bridges():
    only_in_jax_session()
    offenders = [
        str(path.relative_to(SRC))
        for path in sources(lambda rel: rel.parts[0] == "_bridges")
        if BACKEND_BRANCH.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"keras.backend.backend() outside _bridges/: {offenders}"


MODULE_KIND_IMPORT = re.compile(
    r"^\s*(?:import\s+flax\.(?:linen|nnx)|from\s+flax\s+import\s+nnx)\b", re.M
)


def test_module_kind_branches_live_in_the_adapters():
    only_in_jax_session()
    allowed = {"_linen.py", "_nnx.py", "_types.py", "_compat.py"}  # _types: annotations only
    offenders = [
        str(path.relative_to(SRC))
        for path in sources(lambda rel: rel.name in allowed)
        if MODULE_KIND_IMPORT.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, f"flax.linen / flax.nnx imported outside the adapters: {offenders}"


def test_keras_call_scopes_are_where_compat_reads_them():
    from keras.src.backend import AutocastScope
    from keras.src.backend.common.symbolic_scope import SymbolicScope

    from flaxlayer._compat import keras_call_is_plain, variable_values

    x = keras.ops.ones((2, 3))
    assert keras_call_is_plain(x)
    for scope in (keras.StatelessScope(), SymbolicScope(), AutocastScope("float16")):
        with scope:
            assert not keras_call_is_plain(x), f"update _compat.keras_call_is_plain: {scope}"
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, inputs):
            seen.append(keras_call_is_plain(inputs))
            return inputs

    Probe()(x)
    assert seen == [False], "update _compat.keras_call_is_plain: enclosing layer calls"
    masked = keras.layers.Masking(0.0)(x)
    assert not keras_call_is_plain(masked), "update _compat.keras_call_is_plain: masks"
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    values = [keras.ops.convert_to_numpy(v) for v in variable_values(layer.weights)]
    for value, variable in zip(values, layer.weights, strict=True):
        np.testing.assert_array_equal(value, keras.ops.convert_to_numpy(variable.value))


def test_nnx_nodes_keep_their_bookkeeping_where_compat_reads_it():
    from flax import nnx

    from flaxlayer._compat import nnx_node_attributes, nnx_node_without_init

    class Block(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
            self.width = 3

    module = Block()
    attributes, data = nnx_node_attributes(module)
    assert list(attributes) == ["linear", "width"], "update _compat.nnx_node_attributes"
    assert data is not None and data["linear"] is True, "update _compat.nnx_node_attributes"
    copy = nnx_node_without_init(Block, data)
    for name, value in attributes.items():
        object.__setattr__(copy, name, value)
    assert nnx.graphdef(copy) == nnx.graphdef(module), "update _compat.nnx_node_without_init"


def test_distributions_keep_their_layout_map():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution lays variables out on the JAX backend only")
    from flaxlayer._compat import distribution_layout_map

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    model_parallel = keras.distribution.ModelParallel(layout_map=layout_map)
    assert distribution_layout_map(model_parallel) is layout_map, "update distribution_layout_map"
    assert distribution_layout_map(keras.distribution.DataParallel(devices=devices)) is None


def test_torch_tensors_count_their_in_place_writes():
    if keras.backend.backend() != "torch":
        pytest.skip("the PyTorch bridge reads it on the torch backend only")
    import torch

    from flaxlayer._compat import torch_tensor_version

    version = torch_tensor_version()
    tensor = torch.zeros(2)
    before = version(tensor)
    tensor.add_(1.0)
    assert version(tensor) > before, "update _compat.torch_tensor_version"
