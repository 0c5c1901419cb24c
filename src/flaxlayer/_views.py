"""The views every flaxlayer layer gives of its variables: `params`, `state` and `describe`.

Only the public views and their documentation live here; they read the layer's variables part
(`LayerVariables`) and nothing else.
"""

from collections.abc import Callable
from typing import Any, Protocol

from flaxlayer import _compat
from flaxlayer._adapter import Adapter
from flaxlayer._build import Blueprint
from flaxlayer._describe import table_lines
from flaxlayer._store import LayerVariables
from flaxlayer._types import PyTree


class _Layer(Protocol):
    """What the views below use of the layer."""

    _adapter: Adapter
    _blueprint: Blueprint
    _store: LayerVariables | None

    @property
    def trainable_weights(self) -> list: ...

    def _owner_name(self) -> str: ...


class ViewMethods:
    """`params`, `state`, `describe` (on `JaxLayer`)."""

    @property
    def params(self: _Layer) -> PyTree:
        """The trainable variables as a pytree mirroring the params tree (before build, the
        `params` the layer was given, as `keras.layers.JaxLayer` shows them)."""
        if _compat.called_by_keras_saving_walk():
            return None
        return _tree(self, "params", 0)

    @property
    def state(self: _Layer) -> PyTree:
        """The non-trainable variables as a pytree mirroring the state tree (before build,
        the `state` the layer was given)."""
        if _compat.called_by_keras_saving_walk():
            return None
        return _tree(self, "state", 1)

    def describe(self: _Layer, print_fn: Callable[[str], Any] | None = None) -> None:
        """Prints the layer's variables as a table, one row per variable, as `nn.tabulate`
        shows a Flax model: the Flax path (NNX: the attribute path; JaxLayer: the pytree path
        under `params/` or `state/`), shape, dtype, whether it is trainable (as in
        `layer.trainable_weights`) and its element count; then the totals, with bytes.

        Args:
            print_fn: Called with each line, as `model.summary(print_fn=...)`; default `print`.

        Raises:
            ValueError: if the layer is not built yet.

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(2), name="net")
        >>> layer.build((None, 3))
        >>> layer.describe()  # doctest: +NORMALIZE_WHITESPACE
        FlaxLayer 'net' (Linen module Dense)
        path           shape   dtype    trainable  count
        ------------------------------------------------
        params/bias    (2,)    float32  yes            2
        params/kernel  (3, 2)  float32  yes            6
        ------------------------------------------------
        Total: 8 params (32.00 B); trainable: 8 (32.00 B); non-trainable: 0 (0.00 B)
        """
        if self._store is None:
            raise ValueError(
                f"{self._owner_name()} is not built yet, so it has no variables to describe. "
                "Build it first: call it once on inputs (`layer(x)`), call "
                "`layer.build(input_shape)` (e.g. `layer.build((None, 8, 8, 1))`), or build or "
                "call the model that holds it."
            )
        store = self._store
        what = self._adapter.model_name()
        title = self._owner_name() + (f" ({what})" if what else "")
        trainable = {id(v) for v in self.trainable_weights}
        for line in table_lines(title, store.groups(), trainable):
            (print if print_fn is None else print_fn)(line)


def _tree(layer: _Layer, what: str, index: int) -> Any:
    if layer._store is None and layer._blueprint.given is not None:
        return layer._blueprint.given[index]
    store = built_variables(layer, what)
    if index == 0:
        return store.params_layout.unflatten(store.param_vars)
    return store.state_layout.unflatten(store.state_vars)


def module_values(layer: _Layer, what: str) -> tuple[Any, Any]:
    """Copies of the current values as the module sees them: snapshots the caller keeps."""
    return built_variables(layer, what).module_values()


def built_variables(layer: _Layer, what: str) -> LayerVariables:
    """The layer's variables; a ValueError naming `what` needs them before it is built."""
    if layer._store is None:
        raise ValueError(
            f"{layer._owner_name()}: `{what}` exists once the layer is built. Call the layer "
            "on inputs (or model.build / layer.build(input_shape)) first."
        )
    return layer._store
