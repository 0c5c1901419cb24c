"""Loading values into a built layer's variables: the weights file's values checked against
the configured layer, first values of deferred variables, placeholders while Keras loads, and
the initial values of a layer from a file used before any weights came.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from flaxlayer import _compat, _finetune
from flaxlayer._adapter import Adapter
from flaxlayer._bridges import fill_placeholder, placeholder_for_loading
from flaxlayer._build import BuildInputs, initial_trees
from flaxlayer._lifecycle import Lifecycle, Phase
from flaxlayer._program import concrete
from flaxlayer._saving import SerializationError
from flaxlayer._store import LayerVariables
from flaxlayer._variables import TreeLayout


@contextlib.contextmanager
def file_errors(owner: str, adapter: Adapter, what: str, applies: bool) -> Iterator[None]:
    """Where `applies` (the layer comes from a file), an error of the module the file
    configured is a SerializationError that names the layer and what the file configures."""
    if not applies:
        yield
        return
    try:
        yield
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(
            f"{owner}: the module configured by the file {what}: {type(e).__name__}: {e}. "
            f"The file configures: {adapter.summary()}"
        ) from e


def checked_file_values(owner: str, variables: Sequence[Any], store: Any) -> list:
    """The values a weights file's `store` holds for `variables`, checked: as many, and each
    of the variable's shape."""
    if len(store.keys()) != len(variables):
        raise SerializationError(
            f"{owner}: the weights file holds {len(store.keys())} variables for this layer, "
            f"but the layer has {len(variables)}. The file was saved from a different "
            "model or module configuration."
        )
    values = [store[str(i)] for i in range(len(variables))]
    problems = [
        f"{v.path}: the file stores shape {tuple(value.shape)}, the configured layer has "
        f"{tuple(v.shape)}"
        for v, value in zip(variables, values, strict=True)
        if tuple(value.shape) != tuple(v.shape)
    ]
    if problems:
        raise SerializationError(
            f"{owner}: the weights file does not match the module:\n  "
            + "\n  ".join(problems)
            + "\nNo weight was loaded. Load a file saved from this module configuration."
        )
    return values


def check_given_values(owner: str, variables: Sequence[Any], values: Sequence[Any]) -> None:
    """`set_weights` values: one per variable, each of its shape."""
    if len(values) != len(variables):
        raise ValueError(
            f"{owner}: set_weights got {len(values)} arrays for {len(variables)} weights."
        )
    for variable, value in zip(variables, values, strict=True):
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise ValueError(
                f"{owner}: set_weights got shape {np.shape(value)} for {variable.path}, whose "
                f"shape is {tuple(variable.shape)}."
            )


def fill(variables: Sequence[Any], values: Sequence[Any], *, cast: bool = True) -> None:
    """Gives every variable its value: the first value of a deferred one (in its dtype with
    `cast`), an assignment otherwise."""
    for variable, value in zip(variables, values, strict=True):
        if _compat.is_deferred(variable):
            first = np.asarray(value, variable.dtype) if cast else value
            _compat.initialize_deferred(variable, first)
        else:
            fill_placeholder(variable, value)


def placeholder_while_loading() -> Callable | None:
    """Inside Keras's deserialization, the backend's placeholder maker (TensorFlow and
    PyTorch read variables before the weights file comes); None elsewhere."""
    if _compat.keras_safe_mode() is None:
        return None
    return placeholder_for_loading()


def fill_deferred(owner: str, variables: Sequence[Any], placeholder: Callable) -> None:
    """Every deferred variable given a placeholder; one the backend cannot make (a size the
    file gives that no memory could hold) is the file's error."""
    for variable in variables:
        if _compat.is_deferred(variable):
            try:
                value = placeholder(variable.shape, variable.dtype)
            except Exception as e:
                raise SerializationError(
                    f"{owner}: the file configures {variable.path} at shape "
                    f"{tuple(variable.shape)}, which cannot be held until the weights file "
                    f"confirms it: {type(e).__name__}: {str(e)[:300]}"
                ) from e
            _compat.initialize_deferred(variable, value)


def initial_values(adapter: Adapter, build: BuildInputs, store: LayerVariables) -> list:
    """The values a fresh build would give `store`'s variables, in the weights file's order;
    zeros where nothing can re-create them (an NNX module, or a JaxLayer without init_fn)."""
    params, state = initial_trees(adapter, build)
    param_values = [concrete(x) for x in TreeLayout(params).take_leaves()]
    extras = _finetune.stored_from_module(store, param_values)
    return param_values + [concrete(x) for x in TreeLayout(state).take_leaves()] + extras


def deferred_initializer(
    owner: str,
    lifecycle: Lifecycle,
    store: LayerVariables,
    index: int,
    materialize: Callable[[], None],
) -> Callable:
    """The initializer of deferred variable `index`: a value for Keras to read early. Inside
    Keras's loading on TensorFlow and PyTorch every deferred variable gets a placeholder;
    elsewhere the layer is given its initial values (`materialize`)."""

    def initializer(shape: Any, dtype: Any) -> Any:
        variables = store.all_vars
        if lifecycle.phase is Phase.DEFERRED:
            placeholder = placeholder_while_loading()
            if placeholder is None:
                materialize()
            else:
                fill_deferred(owner, variables, placeholder)
                lifecycle.move_to(Phase.PLACEHOLDERS)
        return variables[index].value

    return initializer


def materialize(
    lifecycle: Lifecycle, adapter: Adapter, build: BuildInputs, store: LayerVariables
) -> None:
    """Gives a layer rebuilt from a config, used before any weights came, the initial values a
    fresh build makes (zeros where nothing can re-create them: an NNX module, or a JaxLayer
    without init_fn)."""
    lifecycle.move_to(Phase.FILLED)
    fill(store.all_vars, initial_values(adapter, build, store), cast=False)
