"""Every private Keras and JAX name flaxlayer uses, in one place.

Imported without fallbacks: if an upgrade of Keras or JAX moves one, importing flaxlayer fails
at once (and tests/packaging/test_compat.py says which), rather than a feature silently changing.
"""

import contextlib
import operator
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
from flax.nnx import graphlib as nnx_graphlib
from flax.nnx import pytreelib as nnx_pytreelib
from jax._src import xla_bridge as jax_xla_bridge
from jax._src.export import _export as jax_export_internals
from jax._src.interpreters import mlir as jax_mlir
from jax._src.interpreters import partial_eval as jax_partial_eval
from jax._src.lib import _jax as jax_lib
from jax._src.lib.mlir import ir as mlir_ir
from jax._src.lib.mlir import passmanager as mlir_passmanager
from jax._src.lib.mlir.dialects import hlo as mlir_hlo
from keras.src.backend.common import global_state
from keras.src.backend.common.name_scope import current_path
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.saving import saving_lib as keras_saving_lib
from keras.src.saving.serialization_lib import in_safe_mode as keras_safe_mode

__all__ = [
    "called_by_keras_saving_walk",
    "current_path",
    "distribution_layout_map",
    "export_serializer",
    "forget_uninitialized",
    "hashable_mapping",
    "in_stateless_scope",
    "initialize_deferred",
    "inputs_used",
    "is_deferred",
    "jax_host_array_to_torch",
    "jax_scalar_type_dtype",
    "jax_stablehlo_target",
    "keras_call_is_plain",
    "keras_export_format",
    "keras_safe_mode",
    "key_impl_name",
    "nnx_node_attributes",
    "nnx_node_without_init",
    "pytree_state",
    "replace_variable_value",
    "serialize_portable",
    "start_plain_call",
    "tensorflow_flat_call",
    "tensorflow_tape_records",
    "torch_tensor_version",
    "track_variable",
    "tracked_variables",
    "unlocked_tracker",
    "untrack_variable",
    "variable_values",
]


def forget_uninitialized(variables: Iterable[Any]) -> None:
    """Takes deferred variables off Keras's list of variables to initialize at scope exit.

    Keras initializes every variable created inside a `StatelessScope` when such a scope
    exits; flaxlayer initializes its deferred variables itself (from a file, or on first use).
    """
    ids = {id(v) for v in variables}
    pending = global_state.get_global_attribute("uninitialized_variables") or []
    global_state.set_global_attribute(
        "uninitialized_variables", [v for v in pending if id(v) not in ids]
    )


@contextlib.contextmanager
def unlocked_tracker(layer: Any) -> Iterator[None]:
    """Lets a built layer track or untrack variables (Keras locks its tracker after build)."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


# What Keras's `Layer.__call__` reads from its thread-local state: an enclosing layer's call,
# a stateless, symbolic or autocast scope, a distribution.
_CALL_SCOPES = (
    "current_call_ctx",
    "stateless_scope",
    "symbolic_scope",
    "autocast_scope",
    "distribution",
)


def keras_call_is_plain(x: Any) -> bool:
    """Whether Keras's `Layer.__call__` on `x` would do nothing beyond calling `call`: no
    enclosing layer call, Keras scope or distribution is active, and `x` carries no mask."""
    state = global_state.GLOBAL_STATE_TRACKER.__dict__
    if any(state.get(name) is not None for name in _CALL_SCOPES):
        return False
    if getattr(x, "_keras_mask", None) is not None:
        return False
    masks = state.get("_keras_mask_dict")
    return not masks or id(x) not in masks


def variable_values(variables: Iterable[Any]) -> list:
    """The variables' values as `Variable.value` gives them outside every Keras scope (no
    stateless-scope lookup, no autocast): what `keras_call_is_plain` vouches for."""
    return [v._value for v in variables]


def tracked_variables(layer: Any) -> list:
    """A layer's own variables in the order Keras tracks them (trainable ones first)."""
    return layer._trainable_variables + layer._non_trainable_variables


def untrack_variable(layer: Any, variable: Any) -> None:
    """Removes a variable from a layer's weights (as Keras does for its own quantized kernels)."""
    layer._untrack_variable(variable)


def inputs_used(jaxpr: Any) -> list[bool]:
    """Per input of a (open) jaxpr: whether any of its outputs depends on it."""
    return jax_partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[1]


def is_deferred(variable: Any) -> bool:
    """A variable created without a value (inside a StatelessScope), not yet initialized."""
    return variable._value is None


def initialize_deferred(variable: Any, value: Any) -> None:
    """Gives a deferred variable its first value (no copy where the backend allows)."""
    variable._initializer = lambda shape, dtype: value
    variable._deferred_initialize()


def replace_variable_value(variable: Any, value: Any) -> None:
    """Puts `value` (no tracer) in an `nnx.Variable`, from any trace level.

    `Variable.set_value` refuses to run inside a trace other than the variable's own (Keras
    builds a subclassed model inside its symbolic trace); the value put here is not traced.
    """
    object.__setattr__(variable, "_raw_value", value)


def pytree_state() -> Any:
    """The bookkeeping object every NNX node holds (NNX sets it in `__init__` and `merge`)."""
    return nnx_pytreelib.PytreeState()


def hashable_mapping(mapping: dict) -> Any:
    """A node's `_pytree__nodes` (which attributes are data), as `nnx.merge` writes it."""
    return nnx_graphlib.HashableMapping(mapping)


def key_impl_name(key: Any) -> str:
    """The PRNG implementation of a key array, or of an abstract one (a ShapeDtypeStruct)."""
    if isinstance(key, jax.ShapeDtypeStruct):
        return key.dtype._impl.name
    return str(jax.random.key_impl(key))


def called_by_keras_saving_walk() -> bool:
    """Whether the caller of the calling property is Keras's saving walk over attributes.

    `keras.saving` visits every attribute of a layer (`getattr` on each name in `dir`) to find
    nested saveables, on every save and load. flaxlayer's views (`flax_variables`, `module`)
    copy or merge every value: they answer that walk with None instead.
    """
    return sys._getframe(2).f_code is keras_saving_lib._walk_saveable.__code__


def keras_export_format() -> str | None:
    """The module of the Keras exporter that runs the caller (`onnx`, `openvino`, `litert`,
    `saved_model`, ... from `keras.src.export.<module>`), or None outside `model.export`.

    The outermost one: the ONNX and OpenVINO exporters trace through `saved_model`'s archive.
    """
    found = None
    frame: Any = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("keras.src.export."):
            found = name.rsplit(".", 1)[1]
        frame = frame.f_back
    return found


def jax_backends_initialized() -> bool:
    """Whether JAX has started its device clients (after which allocator settings are read)."""
    return bool(jax_xla_bridge.backends_are_initialized())


def jax_host_array_to_torch() -> Any:
    """`convert(array)`: a torch tensor sharing a single-device CPU JAX array's buffer.

    The two calls `torch.from_dlpack(array)` ends in, without the Python wrappers on both sides
    around them (~15 us per array, against ~1 us): the PyTorch bridge hands back several arrays
    per call. Only for CPU arrays: no stream is passed. The export waits until the array is
    computed. torch is imported here, by the PyTorch bridge only.
    """
    import torch

    to_capsule = jax_lib.buffer_to_dlpack_managed_tensor
    from_capsule = torch._C._from_dlpack

    def convert(array: Any) -> Any:
        return from_capsule(to_capsule(array, stream=None))

    return convert


# --------------------------------------------------- JAX's serializer, for the TensorFlow bridge


def jax_stablehlo_target(tensorflow_version: str) -> str:
    """The older of JAX's default StableHLO target and `tensorflow_version`."""
    jax_target = mlir_hlo.get_version_from_compatibility_requirement(
        mlir_hlo.StablehloCompatibilityRequirement.WEEK_4
    )
    return mlir_hlo.get_smaller_version(jax_target, tensorflow_version)


def export_serializer() -> tuple[Any, Any]:
    """(getter, setter) of the function `jax.export` serializes a lowered module with."""

    def get():
        return jax_export_internals._module_to_bytecode

    def set_(fn):
        jax_export_internals._module_to_bytecode = fn

    return get, set_


def serialize_portable(module: Any, target: str) -> bytes:
    """`module` with its CHLO operations expanded, serialized for StableHLO `target`.

    A module the expansion fails on is serialized as it is.
    """
    mlir_hlo.register_stablehlo_passes()  # chlo-legalize-to-stablehlo
    with module.context:
        expanded = mlir_ir.Module.parse(jax_mlir.module_to_bytecode(module))  # JAX keeps its own
        try:
            mlir_passmanager.PassManager.parse(
                "builtin.module(func.func(chlo-legalize-to-stablehlo))"
            ).run(expanded.operation)
        except (mlir_ir.MLIRError, RuntimeError, ValueError):
            expanded = module
    return jax_lib.mlir.serialize_portable_artifact(
        expanded, target, jax_xla_bridge.get_backend().serialize_with_sdy
    )


# ------------------------------------------------------------ TensorFlow's gradient tapes


def tensorflow_tape_records(tensors: Iterable[Any] | None = None) -> bool:
    """Whether a TensorFlow gradient tape records an operation on `tensors` now (None: on any
    tensor, i.e. whether a tape is active). Imported here, when asked: TensorFlow is optional.
    """
    from tensorflow.python.eager import record

    if tensors is None:
        return record.could_possibly_record()
    return record.should_record_backprop(list(tensors))


def tensorflow_flat_call(concrete: Any) -> Any:
    """`call(tensors)` of a `tf.function`'s concrete function on its flat tensor arguments,
    without TensorFlow binding them to its signature first (a third of a small eager call)."""
    captured = concrete.captured_inputs

    def call(tensors: list) -> Any:
        return concrete._call_flat(tensors, captured)

    return call


# ------------------------------------------------------------------- the engine (JaxLayer)


def track_variable(layer: Any, variable: Any) -> None:
    """Adds a variable to a layer's weights (Keras's own layers do so in `add_weight`)."""
    layer._track_variable(variable)


def start_plain_call(layer: Any) -> None:
    """What Keras's `Layer.__call__` does to a layer before a call that `keras_call_is_plain`
    vouches for: marks it called and clears the previous call's losses."""
    if not getattr(layer, "_called", False):  # Keras's tracked __setattr__ is slow
        layer._called = True
    if layer._losses:
        layer._clear_losses()


# --- saving


def jax_scalar_type_dtype(value: Any) -> Any:
    """The dtype of a JAX scalar type (`jnp.float32` and friends, instances of JAX's private
    `_ScalarMeta`), else None."""
    if type(value).__name__ == "_ScalarMeta":
        return value.dtype
    return None


# --- adapters and bridges


# NNX's own bookkeeping attributes of every graph node (`nnx.Pytree`): its state object, and
# which attributes are data (`nnx.data`) rather than static.
_NNX_NODE_STATE = "_pytree__state"
_NNX_NODE_DATA = "_pytree__nodes"


def nnx_node_attributes(node: Any) -> tuple[dict[str, Any], dict[str, bool] | None]:
    """An NNX graph node's own attributes, without NNX's bookkeeping, in definition order; and
    which of them NNX holds as data (`{name: is_data}`, None where the node records none)."""
    attributes = {
        name: value
        for name, value in vars(node).items()
        if name not in (_NNX_NODE_STATE, _NNX_NODE_DATA)
    }
    flags = vars(node).get(_NNX_NODE_DATA)
    data = None if flags is None else {str(k): bool(v) for k, v in flags.items()}
    return attributes, data


def nnx_node_without_init(cls: type, data: dict[str, bool] | None) -> Any:
    """A new `cls` node made as `nnx.merge` makes one: no `__init__`, NNX's bookkeeping set
    (`data` as `nnx_node_attributes` gives it); the caller sets its attributes."""
    node: Any = object.__new__(cls)
    object.__setattr__(node, _NNX_NODE_STATE, pytree_state())
    if data is not None:
        object.__setattr__(node, _NNX_NODE_DATA, hashable_mapping(data))
    return node


def distribution_layout_map(distribution: Any) -> Any:
    """The `keras.distribution.LayoutMap` a distribution was made with, or None (Keras keeps
    it private; `ModelParallel(layout_map=...)` takes it)."""
    return getattr(distribution, "_layout_map", None)


def torch_tensor_version() -> Callable[[Any], int]:
    """`version(tensor)`: torch's count of in-place writes to a tensor (`Tensor._version`,
    which an optimizer step or `Variable.assign` bumps), read at C speed: the PyTorch bridge
    asks it of every variable on every call."""
    return operator.attrgetter("_version")
