"""Pytrees of arrays <-> named Keras variables.

A leaf at tree path ("params", "Dense_0", "kernel") becomes a `keras.Variable` named "kernel"
created under the nested name scopes "params" / "Dense_0", so inside a layer its path is
`<layer>/params/Dense_0/kernel`: what `LayoutMap`, `model.summary()` and errors show.
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from flaxlayer._bridges import initial_value
from flaxlayer._compat import in_stateless_scope


def key_name(key: Any) -> str:
    """The path component of one jax key-path entry."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_parts(keypath: Sequence[Any]) -> tuple[str, ...]:
    # Haiku module names carry "/" ("mlp/~/linear_0"); Keras names may not. Haiku's "~" (a
    # nested module's separator) is dropped: TensorFlow's optimizer slot names are scope names,
    # which may not contain it.
    parts: list[str] = []
    for key in keypath:
        parts.extend(p for p in key_name(key).split("/") if p and p != "~")
    return tuple(parts)


def format_path(parts: Sequence[str]) -> str:
    return "/".join(parts)


def flatten_with_paths(tree: Any, is_leaf: Callable | None = None):
    """Leaves, their path parts, and the treedef of `tree`."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    paths = [path_parts(kp) for kp, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    return leaves, paths, treedef


def is_float_dtype(dtype: Any) -> bool:
    # jnp, not np: NumPy does not count bfloat16 (an ml_dtypes extension type) as floating.
    try:
        return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))
    except TypeError:
        return False


def create_variables(
    leaves: list,
    paths: Sequence[tuple[str, ...]],
    *,
    owner: str,
    prefix: tuple[str, ...],
    trainable: bool,
    dtype_for: Callable[[Any], Any],
    copy: bool = False,
    layout_for: Callable[[tuple[str, ...]], Any] | None = None,
    pending: Callable[[int], Callable] | None = None,
) -> list[keras.Variable]:
    """Creates one Keras variable per leaf, emptying `leaves` as it goes.

    Each slot of `leaves` is cleared as soon as its variable exists, so the caller's arrays are
    never held twice (a 1 GiB model stays ~1 GiB while its variables are created). Without
    `copy`, a variable takes over its array (Keras's JAX trainer donates variable buffers, so the
    array must not be used elsewhere afterwards); with `copy`, each leaf is copied on its own.
    With `pending` (inside a StatelessScope), the leaves are abstract and variable `i` is
    created without a value, `pending(i)` being its initializer.
    """
    variables = []
    seen: dict[tuple[str, ...], int] = {}
    deferred = in_stateless_scope()
    for i, parts in enumerate(paths):
        full = prefix + parts
        if not parts:
            full = (*prefix, "value")
        if full in seen:
            raise ValueError(
                f"{owner}: two leaves map to the variable path {format_path(full)!r}. "
                "Give the tree's entries distinct names."
            )
        seen[full] = i
        value = leaves[i]
        if isinstance(value, (bool, int, float)):  # as keras.layers.JaxLayer: layer dtypes
            value = np.asarray(value, keras.backend.standardize_dtype(type(value)))
        elif pending is not None:
            value = jax.ShapeDtypeStruct(np.shape(value), value.dtype)
        else:
            value = initial_value(value, copy=copy)
        leaves[i] = None
        dtype = dtype_for(value.dtype)
        floating = is_float_dtype(dtype)
        with contextlib.ExitStack() as stack:
            for scope in full[:-1]:
                stack.enter_context(keras.name_scope(scope))
            variables.append(
                keras.Variable(
                    # Inside a stateless scope Keras only accepts a callable, run on scope exit.
                    initializer=pending(i)
                    if pending is not None
                    else (lambda shape, dtype, v=value: v)
                    if deferred
                    else value,
                    shape=tuple(value.shape) if deferred or pending is not None else None,
                    name=full[-1],
                    dtype=dtype,
                    trainable=trainable and floating,
                    # Keras autocasts params only. State is cast inside the compiled function
                    # instead: torch's Variable.assign under an autocast scope writes into a
                    # cast copy, and the update would be lost.
                    autocast=floating and trainable,
                    layout=layout_for(full) if layout_for is not None else None,
                )
            )
        del value
    return variables


def is_array_like(x: Any) -> bool:
    """A leaf that becomes a variable: an array, an abstract array, or a Python number."""
    if isinstance(x, (bool, int, float, np.ndarray, np.generic, jax.Array, jax.ShapeDtypeStruct)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype")


class TreeLayout:
    """A pytree split into the leaves that become variables and the static ones kept as they are.

    As in `keras.layers.JaxLayer`, leaves that are not arrays or numbers (strings, objects of a
    registered pytree class's static part are not leaves at all) are configuration: the module
    sees them unchanged and they are never variables.
    """

    def __init__(self, tree: Any):
        leaves, paths, self.treedef = flatten_with_paths(tree)
        self.index = [i for i, x in enumerate(leaves) if is_array_like(x)]
        self.static = {i: x for i, x in enumerate(leaves) if not is_array_like(x)}
        self.paths = [paths[i] for i in self.index]
        self._leaves = [leaves[i] for i in self.index]

    def take_leaves(self) -> list:
        """The variable leaves of the tree this layout was made from (handed over once)."""
        leaves, self._leaves = self._leaves, []
        return leaves

    def unflatten(self, values: Sequence[Any]) -> Any:
        full = [None] * self.treedef.num_leaves
        for i, value in zip(self.index, values, strict=True):
            full[i] = value
        for i, value in self.static.items():
            full[i] = value
        return self.treedef.unflatten(full)

    def variable_leaves(self, tree: Any) -> list | None:
        """The leaves of `tree` at this layout's variable positions; None if shaped otherwise."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            return None
        return [leaves[i] for i in self.index]
