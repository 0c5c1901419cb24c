"""FlaxLayer: JaxLayer with an adapter for the Flax module it wraps."""

from typing import Any

import flax.linen as nn
import keras
from flax import nnx

from flaxlayer._jax_layer import JaxLayer
from flaxlayer._linen import LinenAdapter
from flaxlayer._methods import Method
from flaxlayer._nnx import NNXAdapter
from flaxlayer._serialization import Decoder, Encoder, SerializationError


@keras.saving.register_keras_serializable(package="flaxlayer")
class FlaxLayer(JaxLayer):
    """Keras layer that wraps a Flax module.

    The module's `method` (default `__call__`) must take `inputs` (an array or a pytree of
    arrays) and may take `training` (True in `fit`, False in `predict`, `evaluate` and plain
    calls). `method` may also be a method name, a bound method of the module, or a function
    whose first argument is `module`.

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
        variables: The variables dict `module.init` returns (e.g. trained ones), used instead of
            initializing at build time. Checked against what the module creates.
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...) and `seed`.

    Example:

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> layer = FlaxLayer(nn.Dense(3))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
    >>> layer.params["params"]["kernel"].path
    'flax_layer/params/kernel'
    >>> out = nn.Dense(3).apply(layer.flax_variables, jnp.ones((2, 4)))  # back to pure Flax
    """

    def __init__(self, module: Any, method: Any = None, variables: Any = None, **kwargs):
        seed = kwargs.pop("seed", None)
        # FlaxLayer has no call_fn/init_fn of its own: it skips JaxLayer.__init__ and gives the
        # engine an adapter for the module instead.
        keras.layers.Layer.__init__(self, **kwargs)
        self.method = method
        self.call_fn = self.init_fn = None
        self._setup(_adapter_for(module, method, self._owner_name()), variables, seed, kwargs)

    @property
    def module(self) -> Any:
        """The wrapped module.

        For NNX, once built: a new module holding a copy of the layer's current values (the
        module passed in gave its arrays to the layer's variables).
        """
        return self._core.adapter.module_object(self)

    @property
    def flax_variables(self) -> dict:
        """A copy of the current values, in the format `module.init` returns.

        `module.apply(layer.flax_variables, x)` gives what the layer gives: train in Keras,
        deploy in pure Flax. The arrays are a snapshot: later training does not change them,
        and they stay valid after it.
        """
        self._check_built("flax_variables")
        return self._core.adapter.export(*self._values())

    def get_config(self) -> dict:
        """The layer's configuration; the module's is read from its dataclass fields.

        Raises a ValueError naming the module class and field for a field that cannot be saved
        (a lambda, a closure, an arbitrary object).
        """
        config = keras.layers.Layer.get_config(self)
        encoder = Encoder(self._owner_name())
        config.update(
            module=encoder.module(self.module),
            method=_method_to_config(self._core.adapter.method, encoder, type(self.module)),
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "FlaxLayer":
        config = dict(config)
        decoder = Decoder(f"{cls.__name__} {config.get('name')!r}")
        try:
            module = decoder.decode(config.pop("module"))
            method = _method_from_config(config.pop("method", None), module, decoder)
        except KeyError as e:
            raise SerializationError(
                f"{cls.__name__} {config.get('name')!r}: the config lacks {e}; the file is "
                "damaged or was not written by flaxlayer."
            ) from None
        return super(JaxLayer, cls).from_config({**config, "module": module, "method": method})


def _method_to_config(method: Method, encoder: Encoder, cls: type) -> dict:
    if method.kind == "function":
        return {
            "kind": "function",
            "function": encoder.function(method.fn, f"{cls.__name__}.method"),
        }
    return {"kind": method.kind, "name": method.name}


def _method_from_config(data: dict | None, module: Any, decoder: Decoder) -> Any:
    kind = (data or {}).get("kind", "call")
    if kind == "call":
        return None
    if kind == "function":
        return decoder.value(data["function"])
    name = data.get("name")
    if not isinstance(name, str) or (
        not callable(vars(type(module)).get(name))
        and not callable(getattr(type(module), name, None))
    ):
        raise decoder.fail(f"method {name!r}", f"{type(module).__name__} has no such method.")
    return name if kind == "name" else getattr(module, name)


def _adapter_for(module: Any, method: Any, owner: str):
    if isinstance(module, nn.Module):
        return LinenAdapter(module, method, owner=owner)
    if isinstance(module, nnx.Module):
        return NNXAdapter(module, method, owner=owner)
    raise TypeError(
        f"{owner}: `module` must be a flax.linen.Module or flax.nnx.Module instance; got "
        f"{type(module).__module__}.{type(module).__qualname__}. For a plain JAX function or "
        "a Haiku transform, use flaxlayer.JaxLayer(call_fn, init_fn)."
    )
