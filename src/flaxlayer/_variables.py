"""Pytrees of arrays, as variables see them: leaves with path parts, and tree layouts.

A leaf at tree path ("params", "Dense_0", "kernel") becomes a `keras.Variable` named "kernel"
under the nested name scopes "params" / "Dense_0" (`_store.VariableFactory`), so inside a layer
its path is `<layer>/params/Dense_0/kernel`: what `LayoutMap`, `model.summary()` and errors show.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
