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


def in_stateless_scope() -> bool:
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope as keras_fn
    except ImportError:  # pragma: no cover - private Keras API moved
        return False
    return keras_fn()


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
) -> list[keras.Variable]:
    """Creates one Keras variable per leaf, emptying `leaves` as it goes.

    Each slot of `leaves` is cleared as soon as its variable exists, so the caller's arrays are
    never held twice (a 1 GiB model stays ~1 GiB while its variables are created). Without
    `copy`, a variable takes over its array (Keras's JAX trainer donates variable buffers, so the
    array must not be used elsewhere afterwards); with `copy`, each leaf is copied on its own.
    """
    variables = []
    seen: dict[tuple[str, ...], int] = {}
    on_jax = keras.backend.backend() == "jax"
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
        if not on_jax:
            value = np.array(leaves[i]) if copy else np.asarray(leaves[i])
        else:
            value = jnp.array(leaves[i], copy=True) if copy else leaves[i]
        leaves[i] = None
        dtype = dtype_for(value.dtype)
        floating = is_float_dtype(dtype)
        with contextlib.ExitStack() as stack:
            for scope in full[:-1]:
                stack.enter_context(keras.name_scope(scope))
            variables.append(
                keras.Variable(
                    # Inside a stateless scope Keras only accepts a callable, run on scope exit.
                    initializer=(lambda shape, dtype, v=value: v) if deferred else value,
                    shape=tuple(value.shape) if deferred else None,
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
