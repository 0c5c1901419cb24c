"""FlaxLayer: JaxLayer with an adapter for the Flax module it wraps."""

from typing import Any

import keras

from flaxlayer import _compat, _file_format, _layer_config
from flaxlayer._adapter import ModuleAdapter
from flaxlayer._jax_layer import JaxLayer
from flaxlayer._linen import LinenAdapter
from flaxlayer._methods import Method, method_by_name
from flaxlayer._nnx import NNXAdapter
from flaxlayer._saving import Decoder, Encoder, SerializationError
from flaxlayer._types import FlaxVariables, MethodSpec, Module
from flaxlayer._views import module_values

#: The module kinds FlaxLayer wraps: each adapter says which modules it takes and how they
#: are saved (a new kind is one more adapter here).
MODULE_ADAPTERS: tuple[type[ModuleAdapter], ...] = (LinenAdapter, NNXAdapter)
CODECS = tuple(adapter.codec for adapter in MODULE_ADAPTERS)


@keras.saving.register_keras_serializable(package="flaxlayer")
class FlaxLayer(JaxLayer):
    """Keras layer that wraps a Flax module.

    The module's `method` (default `__call__`) gets the inputs (an array or a pytree of arrays)
    in its first argument, whatever its name. An argument named `training`, `train` or
    `is_training` gets the training flag (True in `fit`, False in `predict`, `evaluate` and
    plain calls), one named `deterministic` its negation; other arguments keep their defaults,
    and a further required one is a `ValueError` showing the wrapper function to write. So
    `__call__(self, x, train: bool = True)` works as written. `method` may also be a method
    name, a bound method of the module, or a function whose first argument is the module.

    The "params" collection becomes trainable Keras variables; every other collection the module
    creates at init (batch_stats, counters, caches) becomes non-trainable variables, updated after
    each call (the module is applied with every collection but "params" mutable). Collections a
    call only sows into ("intermediates", ...) are discarded, except "losses", whose values are
    added to the model's loss. Every rng stream the module asks for gets a fresh key per call.

    Variables are named `<layer>/<collection>/<flax path>`, e.g.
    `flax_layer/params/Dense_0/kernel`.

    Args:
        module: A `flax.linen.Module` or a `flax.nnx.Module` instance.
        method: The method to call; see above.
        variables: The variables `module.init` returns (Linen; e.g. trained ones), or the
            params tree alone (Hugging Face's `model.params`), or an `nnx.State` (NNX), used
            instead of initializing at build time. Checked by applying the module to them
            abstractly, so a decode cache initialised for the full length is accepted.
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...), `seed` and
            `native_serialization_platforms` (see `JaxLayer`).

    Example:

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> layer = FlaxLayer(nn.Dense(3))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
    >>> layer.params["params"]["kernel"].path
    'flax_layer/params/kernel'
    >>> out = nn.Dense(3).apply(layer.flax_variables, jnp.ones((2, 4)))  # back to pure Flax
    """

    _FILE_ENTRIES = ("FlaxLayer", _file_format.FLAX_LAYER)

    def __init__(
        self,
        module: Module,
        method: MethodSpec | None = None,
        variables: FlaxVariables | None = None,
        **kwargs: Any,
    ):
        seed = kwargs.pop("seed", None)
        platforms = kwargs.pop("native_serialization_platforms", None)
        make = lambda owner: _adapter_for(module, method, owner)  # noqa: E731
        self._construct(make, variables, seed, platforms, kwargs)
        self.method = method

    @property
    def module(self) -> Module:
        """The wrapped module.

        For NNX, once built: a new module holding a copy of the layer's current values (the
        module passed in gave its arrays to the layer's variables).
        """
        if _compat.called_by_keras_saving_walk():
            return None  # type: ignore[return-value]
        values = module_values(self, "module") if self.built else None
        return self._module_adapter().module_object(values)

    @property
    def flax_variables(self) -> FlaxVariables:
        """A copy of the current values, in the format `module.init` returns.

        `module.apply(layer.flax_variables, x)` gives what the layer gives: train in Keras,
        deploy in pure Flax. The arrays are a snapshot: later training does not change them,
        and they stay valid after it.
        """
        if _compat.called_by_keras_saving_walk():
            return None  # type: ignore[return-value]
        return self._module_adapter().export(*module_values(self, "flax_variables"))

    def _module_adapter(self) -> ModuleAdapter:
        adapter = self._adapter
        assert isinstance(adapter, ModuleAdapter)
        return adapter

    def _model_config(self) -> dict:
        """The module, read from its dataclass fields, and the method; the shapes of the
        variables given where they are not what an init on the call's inputs makes.

        Raises `SerializationError` naming the module class and field for a value no loader
        could rebuild (a lambda, a closure, an arbitrary object, a function a loader would not
        trust), and warns when a class is defined in `__main__`.
        """
        module = self.module
        encoder = Encoder(self._owner_name(), CODECS)
        config = {
            "module": encoder.module(module),
            "method": _method_to_config(self._module_adapter().method, encoder, type(module)),
        }
        encoder.finish()
        build = self._build_inputs
        planned = build.plan.trees if build is not None else None
        adapter, owner = self._module_adapter(), self._owner_name()
        config.update(_layer_config.given_variables_config(adapter, self._store, planned, owner))
        return config

    @classmethod
    def _model_from_config(cls, config: dict, owner: str) -> dict:
        if "module" not in config:
            raise SerializationError(
                f"{owner}: the config has no `module`; the file is damaged or was not written "
                "by flaxlayer."
            )
        decoder = Decoder(owner, CODECS)
        module = decoder.decode_module(config.pop("module"))
        method = _method_from_config(config.pop("method", None), module, decoder)
        config = _layer_config.given_variables_from_config(config, owner)
        return {**config, "module": module, "method": method}


def _method_to_config(method: Method, encoder: Encoder, cls: type) -> dict:
    if method.kind == "function":
        return {"kind": "function", "function": encoder.method_function(method.fn, cls)}
    return {"kind": method.kind, "name": method.name}


def _method_from_config(data: Any, module: Any, decoder: Decoder) -> Any:
    """None, a method name or a function; names are checked by the adapter at construction."""
    path = ("method",)
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("kind") not in ("call", "name", "bound", "function"):
        raise decoder.fail(path, f"{data!r} is not a method entry.")
    kind = data["kind"]
    if kind == "call":
        if not (set(data) <= {"kind", "name"} and data.get("name", "__call__") == "__call__"):
            raise decoder.fail(path, 'a call method entry is {"kind": "call", "name": "__call__"}.')
        return None
    if kind == "function":
        if set(data) != {"kind", "function"}:
            raise decoder.fail(path, "a function method entry has the keys kind and function.")
        return decoder.decode_method_function(data["function"], (*path, "function"))
    name = data.get("name")
    if set(data) != {"kind", "name"} or not isinstance(name, str):
        raise decoder.fail(path, "a named method entry has the keys kind and name.")
    cls = type(module)
    if method_by_name(cls, name, _adapter_class(module, "").framework) is None:
        raise decoder.fail(
            (*path, "name"),
            f"{name!r} is not a method {cls.__name__} defines (Flax's Module API such as "
            "`init`, `apply` or `tabulate` is never called from a file).",
        )
    return getattr(module, name) if kind == "bound" else name


def _adapter_for(module: Any, method: Any, owner: str):
    return _adapter_class(module, owner)(module, method, owner=owner)


def _adapter_class(module: Any, owner: str) -> type[ModuleAdapter]:
    for adapter in MODULE_ADAPTERS:
        if isinstance(module, adapter.module_base):
            return adapter
    raise TypeError(
        f"{owner}: `module` must be a flax.linen.Module or flax.nnx.Module instance; got "
        f"{type(module).__module__}.{type(module).__qualname__}. For a plain JAX function or "
        "a Haiku transform, use flaxlayer.JaxLayer(call_fn, init_fn)."
    )
