"""Inputs of an eager call, per backend: what the layer's compiled program can take as it is.

An eager `layer(x)` on one concrete array skips Keras's `Layer.__call__` (see
`JaxLayer.__call__`); Keras would convert `x` to a backend tensor and cast a float `x` to the
layer's input dtype. Each function here does the same for the inputs it is sure of, and
returns None for anything else (a tracer or symbolic tensor, a float tensor of another dtype,
not one array): Keras's own path then takes the call.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def _numpy(x: np.ndarray, float_dtype: np.dtype) -> np.ndarray:
    return x.astype(float_dtype) if x.dtype.kind == "f" and x.dtype != float_dtype else x


def jax_input(x: Any, float_dtype: np.dtype) -> Any:
    # NumPy arrays go to the jitted function as they are: jit converts them far faster than a
    # device put in Python.
    if isinstance(x, np.ndarray):
        return _numpy(x, float_dtype)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return None if x.dtype.kind == "f" and x.dtype != float_dtype else x
    return None


def tensorflow_input() -> Callable[[Any, np.dtype], Any]:
    import tensorflow as tf

    eager_tensor = type(tf.constant(0))

    def ready(x: Any, float_dtype: np.dtype) -> Any:
        if not tf.executing_eagerly():
            return None
        if isinstance(x, np.ndarray):
            return _numpy(x, float_dtype)
        if isinstance(x, eager_tensor):
            dtype = x.dtype
            return None if dtype.is_floating and dtype.as_numpy_dtype != float_dtype else x
        return None

    return ready


def torch_input() -> Callable[[Any, np.dtype], Any]:
    import keras
    import torch

    def ready(x: Any, float_dtype: np.dtype) -> Any:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        if isinstance(x, np.ndarray):  # onto Keras's device, as Keras converts it
            return keras.ops.convert_to_tensor(_numpy(x, float_dtype))
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            if x.is_floating_point() and str(x.dtype).rpartition(".")[2] != float_dtype.name:
                return None
            return x
        return None

    return ready
