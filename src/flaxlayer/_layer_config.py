"""What a layer is constructed with, checked once; and the config entries of a `JaxLayer`'s
functions and trees.

`Settings` holds the engine's construction arguments, the same for `JaxLayer` and `FlaxLayer`
(both construct through `JaxLayer._construct`). The functions below write and read the
entries only a `JaxLayer` has: `call_fn`, `init_fn`, and the shapes of `params` and `state`
where nothing can re-create them.
"""

import dataclasses
import random
from typing import Any

import jax
import keras
import numpy as np

from flaxlayer._saving import SerializationError
from flaxlayer._specs import Leaf, dtype_name, spec_from_config, spec_to_config
from flaxlayer._variables import flatten_with_paths, is_float_dtype

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A layer's engine arguments, checked."""

    seed: int | None
    #: The seed of the init key: from Python, not the generator's state, since a build may
    #: run inside a TensorFlow graph or a torch meta trace, where that state has no value.
    init_seed: int
    #: `native_serialization_platforms`, as a tuple.
    platforms: tuple[str, ...] | None
    #: Whether a dtype policy was chosen (the layer's `dtype`, or a global policy): float
    #: variables are then stored in the policy's variable dtype.
    policy_given: bool
    #: Draws the per-call keys; tracked by the layer only once a build shows the model
    #: draws keys (created here, outside any graph a build may run in).
    seed_generator: Any

    def stored_dtype(self, variable_dtype: str, dtype: Any) -> str:
        """The dtype a module variable of `dtype` is stored in: the policy's variable dtype
        for a float one where a policy was chosen, else its own."""
        if self.policy_given and is_float_dtype(dtype):
            return variable_dtype
        return keras.backend.standardize_dtype(dtype)


def settings(owner: str, seed: Any, platforms: Any, dtype: Any) -> Settings:
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"{owner}: `seed` must be None or an int in [0, 2**32); got {seed!r}.")
    if platforms is not None and (
        isinstance(platforms, str) or not set(platforms) <= set(PLATFORMS) or not platforms
    ):
        raise ValueError(
            f"{owner}: `native_serialization_platforms` must be a non-empty sequence of "
            f"{', '.join(repr(p) for p in PLATFORMS)}; got {platforms!r}."
        )
    return Settings(
        seed=seed,
        init_seed=seed if seed is not None else random.randint(1, 10**9),
        platforms=None if platforms is None else tuple(platforms),
        policy_given=dtype is not None or keras.config.dtype_policy().name != "float32",
        seed_generator=keras.random.SeedGenerator(seed),
    )


def settings_config(settings: Settings) -> dict:
    platforms = settings.platforms
    return {
        "seed": settings.seed,
        "native_serialization_platforms": None if platforms is None else list(platforms),
    }


def functions_config(layer: Any, trees: tuple[Any, Any] | None) -> dict:
    """`call_fn`, `init_fn`, and with `trees` (no `init_fn` re-creates them) the shapes of
    `params` and `state`: the weights file holds their values."""
    config = {
        "call_fn": keras.saving.serialize_keras_object(layer.call_fn),
        "init_fn": keras.saving.serialize_keras_object(layer.init_fn),
    }
    if trees is not None:
        owner = layer._owner_name()
        config["params"] = spec_to_config(trees[0], owner, "params")
        config["state"] = spec_to_config(trees[1], owner, "state")
    return config


def functions_from_config(config: dict, owner: str) -> dict:
    """The constructor arguments of `functions_config`'s entries: functions resolved by
    Keras, params and state abstract (nothing sized by the config is allocated)."""
    config = dict(config)
    for name in ("call_fn", "init_fn"):
        if config.get(name) is not None:
            config[name] = _function_from_config(config[name], owner, name)
    return _abstract_entries(config, owner, ("params", "state"))


#: The keys of Keras's entry for a function: its name in `config`, resolved by Keras.
_FUNCTION_KEYS = {"module": (str, type(None)), "class_name": (str,), "config": (str,)}
_FUNCTION_KEYS |= {"registered_name": (str, type(None))}


def _function_from_config(entry: Any, owner: str, name: str) -> Any:
    """A function Keras wrote with `serialize_keras_object`: the entry checked, then resolved
    by Keras (its safe mode and registry); any refusal a SerializationError."""
    where = f"{owner}: cannot load config entry {name}"
    well_formed = (
        isinstance(entry, dict)
        and set(entry) == set(_FUNCTION_KEYS)
        and all(isinstance(entry[k], types) for k, types in _FUNCTION_KEYS.items())
        and entry["class_name"] == "function"
        and len(entry["config"]) <= 1000
    )
    if not well_formed:
        raise SerializationError(
            f"{where}: {str(entry)[:200]} is not Keras's entry of a function (the keys "
            "module, class_name, config and registered_name, each a string; class_name "
            "'function')."
        )
    try:
        function = keras.saving.deserialize_keras_object(entry)
    except Exception as e:
        raise SerializationError(
            f"{where}: Keras cannot resolve {entry['config']!r}: {type(e).__name__}: "
            f"{str(e)[:500]} Register the function with "
            "@keras.saving.register_keras_serializable() in a module the loading script "
            "imports."
        ) from e
    if not callable(function):
        raise SerializationError(f"{where}: {entry['config']!r} is not a function.")
    return function


def _abstract_entries(config: dict, owner: str, names: tuple[str, ...]) -> dict:
    """`config` with the shape entries `names` read as abstract trees (ShapeDtypeStructs)."""
    for name in names:
        if config.get(name) is not None:
            config[name] = jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
                spec_from_config(config[name], owner, (name,), abstract=True),
                is_leaf=lambda x: isinstance(x, Leaf),
            )
    return config


def given_variables_config(adapter: Any, store: Any, planned: Any, owner: str) -> dict:
    """`{"variables": shapes}` where the built variables' shapes are not what an init on the
    call's inputs makes (a decode cache given for the full length, called one token at a
    time): a layer loaded from the file is built to them; `{}` otherwise."""
    if store is None or planned is None:
        return {}
    shapes = store.shapes()
    if _shape_table(shapes) == _shape_table(planned):
        return {}
    entry = adapter.given_entry(*shapes)
    return {} if entry is None else {"variables": spec_to_config(entry, owner, "variables")}


def given_variables_from_config(config: dict, owner: str) -> dict:
    """`config` with its `variables` shapes, if any, as abstract trees: nothing they size
    is allocated before the weights file confirms them."""
    return _abstract_entries(dict(config), owner, ("variables",))


def _shape_table(trees: Any) -> dict:
    leaves, paths, _ = flatten_with_paths(trees)
    return {path: tuple(leaf.shape) for path, leaf in zip(paths, leaves, strict=True)}


def given_shapes(given: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """The shapes and dtypes of a layer's given (params, state), before it is built."""
    params, state = given or (None, None)
    return _shapes(params), _shapes(state)


def _shapes(tree: Any) -> Any:
    if tree is None:
        return None
    return jax.tree.map(
        lambda x: Leaf(np.shape(x), dtype_name(x)) if hasattr(x, "dtype") else x, tree
    )


def build_config(spec: Any, owner: str) -> dict | None:
    """The build config of a layer built for inputs `spec` (None before it knows them)."""
    return None if spec is None else {"input_spec": spec_to_config(spec, owner, "input")}


def recorded_inputs(config: Any, owner: str, from_file: bool) -> Any:
    """The input spec a build config `get_build_config` wrote records, read; None for another
    (Keras's `input_shape` one). From a file, it is `{"input_spec": ...}` and nothing else."""
    if from_file and not (isinstance(config, dict) and set(config) == {"input_spec"}):
        raise SerializationError(
            f"{owner}: cannot load build_config: {str(config)[:200]} is not the build config "
            'flaxlayer writes ({"input_spec": the recorded inputs}).'
        )
    if not (isinstance(config, dict) and "input_spec" in config):
        return None
    return spec_from_config(config["input_spec"], owner, ("build_config", "input_spec"))


def rebuild(cls: type, config: dict, owner: str) -> Any:
    """`cls(**config)`, a refusal of the file's arguments as a SerializationError."""
    try:
        return cls(**config)
    except SerializationError:
        raise
    except Exception as e:  # the module's or Keras's own code refused the file's values
        raise SerializationError(
            f"{owner}: cannot rebuild the layer from the file: {type(e).__name__}: {e}"
        ) from e


def owner_of(cls: type, config: dict) -> str:
    return f"{cls.__name__} {config.get('name')!r}"
