"""Top-level Flax modules and functions for the serialization tests.

Everything here is defined at the top level of an importable module, so a saved model can find
it again by name. Nothing here defines get_config/from_config or is registered with Keras,
except where a name says so (CustomConfigDense, the `registered_*` functions).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras

# The seed's examples and the several-method module live in core_models.py (each module is
# defined once); the serialization tests use them from here too.
from core_models import MLP
from core_models import EncoderModule as EncoderModule
from core_models import MyFlaxModule as MyFlaxModule
from core_models import TwoInputModule as TwoInputModule
from core_models import my_flax_module_wrapper as my_flax_module_wrapper

# -------------------------------------------------------------- modules with state and dropout

#: Dense + BatchNorm + Dropout + Dense, taking `training` (core_models' MLP).
BatchNormDropoutNet = MLP


class BatchNormNet(nn.Module):
    """Dense + BatchNorm (state: batch_stats) + Dense, taking `training`."""

    hidden: int = 8
    out: int = 3

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(self.hidden)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        x = nn.relu(x)
        return nn.Dense(self.out)(x)


class SmallDense(nn.Module):
    """One Dense layer with a required field."""

    features: int

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(self.features)(inputs)


# ------------------------------------------------------------ modules whose config is captured


class Block(nn.Module):
    """A Dense layer and an activation, both configurable."""

    features: int = 4
    act: Callable = nn.relu
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs):
        return self.act(nn.Dense(self.features, kernel_init=self.kernel_init)(inputs))


class Kitchen(nn.Module):
    """A module with a field of every kind the serializer captures.

    Only some fields take part in the computation (numpy functions cannot run on JAX tracers);
    the rest are there to be captured and restored.
    """

    block: nn.Module = None
    dense: nn.Module = None
    blocks: tuple = ()
    sizes: tuple = ()
    widths: list = None
    table: dict = None
    rate: float = 0.0
    big: float = 0.0
    small_scalar: Any = None
    label: str = ""
    flag: bool = False
    nothing: Any = "something"
    storage_dtype: Any = None
    param_dtype: Any = None
    acts: tuple = ()
    np_act: Callable = None
    partial_act: Callable = None
    inits: dict = None
    norm_cls: type = None

    @nn.compact
    def __call__(self, inputs):
        x = self.block(inputs)
        x = self.dense(x)
        for b in self.blocks:
            x = b(x)
        x = self.norm_cls(param_dtype=self.param_dtype)(x)
        x = self.partial_act(x)
        for act in self.acts:
            x = act(x)
        return x


FROM_CONFIG_CALLS: list = []


class Scale:
    """A plain object the serializer cannot capture by itself."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Scale) and other.value == self.value

    def __hash__(self):
        return hash(self.value)


class CustomConfigDense(nn.Module):
    """Defines get_config/from_config itself (and holds a field only those can save)."""

    features: int = 3
    scale: Any = None

    def get_config(self):
        return {"features": self.features, "scale_value": self.scale.value}

    @classmethod
    def from_config(cls, config):
        FROM_CONFIG_CALLS.append(dict(config))
        return cls(features=config["features"], scale=Scale(config["scale_value"]))

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(self.features)(inputs) * self.scale.value


class PartialNorm(nn.Module):
    """Takes a functools.partial of a Flax module class (a common Flax idiom)."""

    norm: Callable = functools.partial(nn.LayerNorm, epsilon=1e-3)

    @nn.compact
    def __call__(self, inputs):
        return self.norm()(nn.Dense(3)(inputs))


class Activated(nn.Module):
    """Dense and an activation field (used for tampering with a function reference)."""

    features: int = 3
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, inputs):
        return self.act(nn.Dense(self.features)(inputs))


class Offset(nn.Module):
    """Adds `make_offset()`: a field called with no arguments (e.g. partial(jnp.ones, (3,)))."""

    make_offset: Callable = functools.partial(jnp.ones, (3,))

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(3)(inputs) + self.make_offset()


class HoldsAnything(nn.Module):
    """A field of any type, to give it values that cannot be saved."""

    features: int = 2
    thing: Any = None

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(self.features)(inputs)


class Wrapper(nn.Module):
    """Holds a submodule as a field (for errors naming a nested field)."""

    inner: nn.Module = None

    @nn.compact
    def __call__(self, inputs):
        return self.inner(inputs)


class WithLocalClass(nn.Module):
    """A module whose field is filled by a test with a class defined inside a function."""

    norm_cls: type = nn.LayerNorm

    @nn.compact
    def __call__(self, inputs):
        return self.norm_cls()(inputs)


# ---------------------------------------------------------------------------- JaxLayer functions


@keras.saving.register_keras_serializable(package="flaxlayer_sertest")
def registered_init(rng, inputs):
    k1, _ = jax.random.split(rng)
    return {"w": jax.random.normal(k1, (inputs.shape[-1], 3)), "b": jnp.zeros((3,))}


@keras.saving.register_keras_serializable(package="flaxlayer_sertest")
def registered_call(params, inputs):
    return inputs @ params["w"] + params["b"]


@keras.saving.register_keras_serializable(package="flaxlayer_sertest")
def registered_stateful_init(rng, inputs):
    params = {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}
    state = {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((inputs.shape[-1],))}
    return params, state


@keras.saving.register_keras_serializable(package="flaxlayer_sertest")
def registered_stateful_call(params, state, inputs, training):
    out = inputs @ params["w"]
    if training:
        state = {
            "count": state["count"] + 1.0,
            "mean": 0.5 * state["mean"] + 0.5 * jnp.mean(inputs, axis=0),
        }
    return out - jnp.sum(state["mean"]), state


def params_only_call(params, inputs):
    """Unregistered; used with `params=` and no init_fn."""
    return jnp.tanh(inputs @ params["kernel"]) + params["bias"]
