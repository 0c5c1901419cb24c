"""Type aliases of the public signatures (what the API reference shows)."""

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import flax.linen as nn
from flax import nnx

#: A nested structure of dicts, lists and tuples whose leaves are arrays (a JAX pytree).
PyTree: TypeAlias = Any

#: A Flax module instance, Linen or NNX.
Module: TypeAlias = nn.Module | nnx.Module

#: What `FlaxLayer(method=...)` takes: a method name, a bound method, or a function whose first
#: argument is the module.
MethodSpec: TypeAlias = str | Callable[..., Any]

#: Flax variables: the dict `module.init` returns (Linen) or an `nnx.State` (NNX).
FlaxVariables: TypeAlias = Mapping[str, Any] | nnx.State
