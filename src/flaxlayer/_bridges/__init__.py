"""Backend bridges: run a pure JAX function on the tensors of the active Keras backend.

Every branch on the Keras backend lives in this package: compiling the pure program, the values
variables start from and are read back as, placeholders while a file loads, and whether
`keras.distribution` applies.
"""

import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import keras
import numpy as np

SUPPORTED_BACKENDS = ("jax", "tensorflow", "torch")


def compile_for_backend(pure: Callable, *, owner: str, platforms=None) -> Callable:
    """Returns `run(params, state, rng, inputs, training)` for the active Keras backend.

    `params` and `state` are lists of backend tensors; `run` returns (outputs, new state leaves,
    summed losses) as backend tensors, differentiable with respect to params and inputs.
    `platforms` (`native_serialization_platforms`) is used by the TensorFlow bridge only.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        from flaxlayer._bridges.jax import compile_jax

        return compile_jax(pure)
    if backend == "tensorflow":
        from flaxlayer._bridges.tensorflow import compile_tensorflow

        return compile_tensorflow(pure, owner, platforms=platforms)
    if backend == "torch":
        from flaxlayer._bridges.torch import compile_torch

        return compile_torch(pure, owner)
    raise unsupported_backend(owner, backend)


def eager_input() -> Callable[[Any, np.dtype], Any]:
    """`ready(x, float_dtype)`: `x` as the backend's compiled program takes it in an eager call
    (a float NumPy array cast to `float_dtype`, as Keras's dtype policy casts it), or None where
    only Keras's own call path can take it (a tracer, a symbolic or meta tensor, a float tensor
    of another dtype, anything not one array)."""
    from flaxlayer._bridges import eager

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return eager.tensorflow_input()
    if backend == "torch":
        return eager.torch_input()
    return eager.jax_input


# Settings a user makes for JAX's GPU allocator (any of them: the user chose), and what JAX
# and TensorFlow do without them: JAX reserves 75% of a GPU's memory when it starts its client,
# TensorFlow nearly all of it; next to the Keras backend's framework each would starve the other.
JAX_ALLOCATOR_SETTINGS = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
)
TENSORFLOW_GROWTH_SETTING = "TF_FORCE_GPU_ALLOW_GROWTH"


def share_accelerator_memory() -> None:
    """Lets JAX share an accelerator with the Keras backend's framework.

    On the PyTorch and TensorFlow backends JAX runs next to another framework in one process.
    Unless the user configured JAX's allocator, JAX is told to allocate on demand
    (`XLA_PYTHON_CLIENT_PREALLOCATE=false`), which it reads when it starts its device clients:
    only if it has not started them yet. On TensorFlow, unless the user set
    `TF_FORCE_GPU_ALLOW_GROWTH`, TensorFlow grows its allocation rather than taking nearly all
    of the memory (TensorFlow reads it when it starts its GPUs). Called on `import flaxlayer`.
    """
    from flaxlayer import _compat

    backend = keras.backend.backend()
    if backend not in ("torch", "tensorflow"):
        return
    chosen = any(name in os.environ for name in JAX_ALLOCATOR_SETTINGS)
    if not chosen and not _compat.jax_backends_initialized():
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if backend == "tensorflow":
        os.environ.setdefault(TENSORFLOW_GROWTH_SETTING, "true")


def unsupported_backend(owner: str, backend: str) -> RuntimeError:
    return RuntimeError(
        f"{owner}: the Keras backend is {backend!r}, but flaxlayer runs on "
        f"{', '.join(repr(b) for b in SUPPORTED_BACKENDS)}. Set KERAS_BACKEND to one of them "
        "before importing keras (or in ~/.keras/keras.json)."
    )


def check_backend(owner: str) -> None:
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise unsupported_backend(owner, backend)


# The Keras exporters (`model.export(format=...)`) that cannot convert the layer's computation
# on a backend, with what works instead. ONNX is converted by the bridges (`_onnx.py`).
_OPENVINO_ALTERNATIVE = (
    "OpenVINO reads ONNX: export ONNX and convert that file, e.g.\n"
    '    model.export("model.onnx", format="onnx")\n'
    '    import openvino as ov; ov.save_model(ov.convert_model("model.onnx"), "model.xml")'
)
UNSUPPORTED_EXPORTS = {
    ("tensorflow", "openvino"): _OPENVINO_ALTERNATIVE,
    ("torch", "openvino"): _OPENVINO_ALTERNATIVE,
}


def check_export_format(owner: str) -> str | None:
    """The format of the Keras export tracing the caller (None if none runs); raises before the
    converter runs if that format cannot take the layer on this backend."""
    from flaxlayer import _compat

    fmt = _compat.keras_export_format()
    alternative = UNSUPPORTED_EXPORTS.get((keras.backend.backend(), fmt or ""))
    if alternative is not None:
        raise NotImplementedError(
            f"{owner}: model.export(format={fmt!r}) on the {keras.backend.backend()} backend "
            f"cannot convert this layer: its computation reaches the converter as compiled "
            f"XLA, which the {fmt} converter does not read. {alternative}"
        )
    return fmt


def outside_compiled_graphs(fn: Callable) -> Callable:
    """`fn`, kept out of torch.compile's graphs on the PyTorch backend (dynamo cannot trace JAX).

    Keras's `jit_compile=True` on torch compiles the model's call with dynamo; JAX work done in
    `call` (not only the bridge's run) must run as plain Python there.
    """
    if keras.backend.backend() != "torch":
        return fn
    import torch

    return torch.compiler.disable(fn)


def placeholder_for_loading() -> Callable | None:
    """`make(shape, dtype)` of a value that holds no memory until written, if the backend has one.

    While a file loads, Keras reads variables before their weights come: the torch backend
    every variable of a model it builds, the TensorFlow optimizer the variables it will train.
    A deferred variable then gets such a placeholder instead of an initializer run at the size
    the file's config names. JAX reads nothing: None.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        from flaxlayer._bridges.torch import untouched_empty

        return untouched_empty
    if backend == "tensorflow":
        from flaxlayer._bridges.tensorflow import untouched_empty

        return untouched_empty
    return None


def fill_placeholder(variable: Any, value: Any) -> None:
    """Gives a variable that may hold a `placeholder_for_loading` value its loaded value."""
    if keras.backend.backend() == "torch":
        from flaxlayer._bridges.torch import fill_placeholder as fill_torch

        fill_torch(variable, value)
    else:
        variable.assign(value)


def supports_distribution() -> bool:
    """`keras.distribution` lays variables out on JAX devices: the JAX backend only."""
    return keras.backend.backend() == "jax"


def initial_value(array: Any, *, copy: bool) -> Any:
    """What a Keras variable is created from, for a JAX `array`.

    On JAX the array itself (the variable takes it over) or a copy; on the other backends a
    NumPy array, which the backend copies into its own tensor.
    """
    if keras.backend.backend() == "jax":
        return jnp.array(array, copy=True) if copy else array
    return np.array(array) if copy else np.asarray(array)


def jax_copy(value: Any) -> Any:
    """A JAX array copy of a variable's value (never a view of the variable's buffer)."""
    if keras.backend.backend() == "jax":
        return jnp.copy(value)
    return jnp.asarray(keras.ops.convert_to_numpy(value))
