"""Every private Keras and JAX name flaxlayer uses, in one place.

Imported without fallbacks: if a Keras upgrade moves one, importing flaxlayer fails at once
(and the test suite's first test says which), rather than a feature silently changing.
"""

from collections.abc import Iterable
from typing import Any

from keras.src.backend.common import global_state
from keras.src.backend.common.name_scope import current_path
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.saving.serialization_lib import in_safe_mode as keras_safe_mode

__all__ = [
    "called_by_keras_saving_walk",
    "current_path",
    "forget_uninitialized",
    "in_stateless_scope",
    "initialize_deferred",
    "is_deferred",
    "keras_safe_mode",
    "key_impl_name",
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


def is_deferred(variable: Any) -> bool:
    """A variable created without a value (inside a StatelessScope), not yet initialized."""
    return variable._value is None


def initialize_deferred(variable: Any, value: Any) -> None:
    """Gives a deferred variable its first value (no copy where the backend allows)."""
    variable._initializer = lambda shape, dtype: value
    variable._deferred_initialize()


def key_impl_name(key: Any) -> str:
    """The PRNG implementation of a key array, or of an abstract one (a ShapeDtypeStruct)."""
    import jax

    if isinstance(key, jax.ShapeDtypeStruct):
        return key.dtype._impl.name
    return str(jax.random.key_impl(key))


def called_by_keras_saving_walk() -> bool:
    """Whether the caller of the calling property is Keras's saving walk over attributes.

    `keras.saving` visits every attribute of a layer (`getattr` on each name in `dir`) to find
    nested saveables, on every save and load. flaxlayer's views (`flax_variables`, `module`)
    copy or merge every value: they answer that walk with None instead.
    """
    import sys

    from keras.src.saving import saving_lib

    return sys._getframe(2).f_code is saving_lib._walk_saveable.__code__
