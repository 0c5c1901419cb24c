"""The eager fast path: `layer(x)` on one concrete array, without Keras's `Layer.__call__`.

Keras's `Layer.__call__` costs more than a small model's compiled call. Where it would do
nothing but cast a float input to the layer's input dtype, clear the last call's losses and
default `training` to False, the layer does exactly that itself. `EagerPath.inputs` says when:
it returns the prepared inputs, or None where `Layer.__call__` must take the call (a mask, a
Keras scope, an enclosing layer's call, mixed precision, a layer still loading, an activity
regularizer or input spec, anything but one array).
"""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import keras
import numpy as np

from flaxlayer import _compat
from flaxlayer._store import LayerVariables


class EagerPath:
    """The guards of one built layer's fast path, with the input dtype of its dtype policy
    (cached for the policy object it was found for)."""

    __slots__ = ("_cast_dtype", "_policy", "_ready", "store")

    def __init__(self, ready: Callable[[Any, np.dtype], Any], store: LayerVariables):
        #: The backend's check and cast of one input (`_bridges.eager_input`).
        self._ready = ready
        #: The layer's variables, read directly (no Keras scope applies on this path).
        self.store = store
        self._policy: Any = None
        self._cast_dtype: np.dtype | None = None

    def inputs(self, layer: Any, x: Any) -> Any:
        """`x` as the compiled program takes it, or None for Keras's path."""
        if layer.activity_regularizer is not None or layer.input_spec is not None:
            return None
        policy = layer.dtype_policy
        if policy is not self._policy:
            self._policy, self._cast_dtype = policy, _plain_input_dtype(layer)
        if self._cast_dtype is None or not layer.autocast or not _compat.keras_call_is_plain(x):
            return None
        return self._ready(x, self._cast_dtype)


def _plain_input_dtype(layer: Any) -> np.dtype | None:
    """The dtype float inputs are cast to, where the layer's dtype policy is one dtype for
    computing and storing (no autocast scope); None otherwise."""
    if isinstance(layer.dtype_policy, keras.dtype_policies.DTypePolicyMap):
        return None
    if layer.compute_dtype != layer.variable_dtype:
        return None
    return np.dtype(jnp.dtype(layer.input_dtype))
