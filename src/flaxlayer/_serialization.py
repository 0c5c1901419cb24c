"""Capturing a Flax module's configuration as JSON, and resolving it back safely.

What is captured: a module's dataclass fields, recursively (submodules, tuples, lists, dicts,
scalars, dtypes, module classes, `functools.partial`, top-level functions, and initializers made
by the JAX/Flax initializer factories). A class that defines `get_config`/`from_config` is
captured through those.

What loading may do (the default, safe mode): look up, never import, Flax module classes in
modules the process has already imported; look up functions only among the numerical functions of
flax, jax and numpy (activations, jax.numpy/lax math, numpy ufuncs; never their file I/O), in the
Keras registry or `custom_objects`, or defined in the Python module of a Flax class being loaded;
call only those classes' constructors and the JAX/Flax initializer factories. Lookups read a
module's own dictionary (and class dictionaries below it) directly: no attribute hook runs and no
path leads through one module into another. Nothing is unpickled.
"""

import dataclasses
import functools
import importlib
import math
import sys
import types
from typing import Any

import keras
import numpy as np
from flax.core import FrozenDict

TAG = "__flaxlayer__"
# Where safe loading may take a function from by module name alone: numerical code only.
TRUSTED_FUNCTION_MODULES = (
    "flax.linen",
    "flax.nnx",
    "jax.nn",
    "jax._src.nn",
    "jax.numpy",
    "jax._src.numpy",
    "jax.lax",
    "jax._src.lax",
    "jax.scipy",
    "jax._src.scipy",
    "jax.random",
    "jax._src.random",
)
# Never resolved from those modules, whatever the file says: they read or write files.
IO_NAMES = frozenset(
    {
        "load",
        "loadtxt",
        "save",
        "savez",
        "savez_compressed",
        "savetxt",
        "fromfile",
        "tofile",
        "genfromtxt",
        "fromregex",
        "memmap",
        "open",
        "tabulate",
    }
)
INITIALIZER_FACTORY_MODULES = ("jax._src.nn.initializers", "flax.linen.initializers")
SKIPPED_FIELDS = ("parent",)


class SerializationError(ValueError):
    """A module or value that cannot be saved, or a config that cannot be loaded."""


def module_classes() -> tuple[type, ...]:
    import flax.linen as nn
    from flax import nnx

    return (nn.Module, nnx.Module)


def loadable_classes() -> tuple[type, ...]:
    """What a file may name as a class: Flax modules, NNX graph nodes and NNX variable types."""
    from flax import nnx

    return (*module_classes(), nnx.Pytree, nnx.Variable)


def in_safe_mode() -> bool:
    try:
        from keras.src.saving.serialization_lib import in_safe_mode as keras_in_safe_mode
    except ImportError:  # pragma: no cover - private Keras API moved
        return True
    return keras_in_safe_mode() is not False


def _ref(obj: Any) -> dict:
    return {"module": obj.__module__, "qualname": getattr(obj, "__qualname__", obj.__name__)}


def _lookup(module_name: str, qualname: str) -> Any:
    """Reads `qualname` from an imported module's own dictionary, then class dictionaries.

    Runs no attribute hook, and never passes through a second module: "config.os.system" read
    from some module is refused even where that module imported `os`.
    """
    module = sys.modules.get(module_name)
    if not isinstance(module, types.ModuleType):
        return None
    first, *rest = qualname.split(".")
    obj = vars(module).get(first)
    for part in rest:
        if not isinstance(obj, type) or part.startswith("<"):
            return None
        obj = next((vars(c)[part] for c in obj.__mro__ if part in vars(c)), None)
    if isinstance(obj, types.ModuleType) or first.startswith("<"):
        return None
    return obj


def _trusted_function(fn: Any, module_name: str, qualname: str) -> bool:
    """A numerical function of flax, jax or numpy, named where it really lives."""
    import numpy

    if isinstance(fn, numpy.ufunc):
        return _in_package(module_name, ("numpy", "jax.numpy"))
    if qualname.rpartition(".")[2] in IO_NAMES:
        return False
    own_module = getattr(fn, "__module__", None) or ""
    return _in_package(module_name, TRUSTED_FUNCTION_MODULES) and _in_package(
        own_module, TRUSTED_FUNCTION_MODULES
    )


def _in_package(module_name: str, packages: tuple[str, ...]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


# ------------------------------------------------------------------------------------ capture


class Encoder:
    """Turns a module (or any field value) into JSON-compatible data; `owner` names the layer."""

    def __init__(self, owner: str):
        self.owner = owner
        self._nodes: dict[int, int] = {}

    def fail(self, where: str, value: Any, why: str) -> SerializationError:
        cls, _, field = where.partition(".")
        return SerializationError(
            f"{self.owner}: cannot save field `{field or where}` of {cls}: {why} (value: "
            f"{value!r}). Use a named top-level function or a value of a supported kind "
            "(numbers, strings, tuples, lists, dicts, dtypes, Flax modules, flax/jax/numpy "
            "functions), register the function with "
            "@keras.saving.register_keras_serializable(), or give "
            f"{cls} get_config() and a classmethod from_config()."
        )

    def module(self, module: Any, where: str | None = None) -> dict:
        cls = type(module)
        where = where or cls.__name__
        if _is_nnx_node(module):
            return self.nnx_node(module, where)
        ref = self.class_ref(cls, where)
        if callable(getattr(cls, "get_config", None)) and callable(
            getattr(cls, "from_config", None)
        ):
            return {TAG: "module", "class": ref, "custom_config": module.get_config()}
        if not dataclasses.is_dataclass(module):
            raise self.fail(where, module, "it is not a dataclass")
        fields = {}
        for f in dataclasses.fields(module):
            if not f.init or f.name in SKIPPED_FIELDS:
                continue
            value = getattr(module, f.name)
            if f.default is not dataclasses.MISSING and value is f.default:
                continue
            if f.name == "name" and value is None:
                continue
            fields[f.name] = self.value(value, f"{cls.__name__}.{f.name}")
        return {TAG: "module", "class": ref, "fields": fields}

    def nnx_node(self, node: Any, where: str) -> dict:
        """An NNX graph node (Module, List, Rngs, ...): its class and attributes, values aside.

        Variables keep their type, shape, dtype and metadata; their values travel in the
        weights file. A node reachable twice is written once and referenced after.
        """
        if id(node) in self._nodes:
            return {TAG: "nnx_ref", "id": self._nodes[id(node)]}
        self._nodes[id(node)] = index = len(self._nodes)
        cls = type(node)
        ref = self.class_ref(cls, where)
        attributes, data = {}, None
        for name, value in vars(node).items():
            if name == "_pytree__state":
                continue
            if name == "_pytree__nodes":
                data = {str(k): bool(v) for k, v in value.items()}
                continue
            attributes[name] = self.value(value, f"{cls.__name__}.{name}")
        return {TAG: "nnx_node", "id": index, "class": ref, "attributes": attributes, "data": data}

    def nnx_variable(self, variable: Any, where: str) -> dict:
        import jax

        value = variable.get_value()
        entry = {
            TAG: "nnx_variable",
            "class": self.class_ref(type(variable), where),
            "shape": list(np.shape(value)),
            "metadata": self.value(dict(variable.get_metadata()), where),
        }
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(value))
        else:
            entry["dtype"] = np.dtype(value.dtype).name
        return entry

    def class_ref(self, cls: type, where: str) -> dict:
        ref = _ref(cls)
        if "<locals>" in ref["qualname"] or _lookup(ref["module"], ref["qualname"]) is not cls:
            raise SerializationError(
                f"{self.owner}: cannot save {where}: class {cls.__qualname__} is not defined at "
                f"the top level of module {cls.__module__!r}, so it could not be found again "
                "when loading. Define it at the top level of an importable module."
            )
        return ref

    def value(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
        if isinstance(value, np.generic):
            return {TAG: "scalar", "dtype": value.dtype.name, "value": value.item()}
        if _is_nnx_variable(value):
            return self.nnx_variable(value, where)
        if isinstance(value, module_classes()) or _is_nnx_node(value):
            return self.module(value, where)
        dtype = _as_dtype(value)
        if dtype is not None:
            return {TAG: "dtype", "name": dtype.name}
        if isinstance(value, type) and issubclass(value, module_classes()):
            return {TAG: "class", "class": self.class_ref(value, where)}
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {TAG: "tuple", "items": [self.value(v, where) for v in value]}
        if isinstance(value, list):
            return [self.value(v, where) for v in value]
        if isinstance(value, (dict, FrozenDict)):
            items = [[self.value(k, where), self.value(v, where)] for k, v in value.items()]
            return {TAG: "frozendict" if isinstance(value, FrozenDict) else "dict", "items": items}
        if isinstance(value, functools.partial):
            return {
                TAG: "partial",
                "func": self.value(value.func, where),
                "args": [self.value(v, where) for v in value.args],
                "keywords": {k: self.value(v, where) for k, v in value.keywords.items()},
            }
        if callable(value):
            return self.function(value, where)
        raise self.fail(where, value, f"objects of type {type(value).__qualname__} are not saved")

    def function(self, fn: Any, where: str) -> dict:
        registered = keras.saving.get_registered_name(fn)
        if (
            registered
            and registered != getattr(fn, "__name__", None)
            and keras.saving.get_registered_object(registered) is fn
        ):
            return {TAG: "function", "registered": registered}
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        module_name = getattr(fn, "__module__", None)
        if name and module_name and _lookup(module_name, name) is fn:
            return {TAG: "function", "module": module_name, "qualname": name}
        factory = self._factory_call(fn)
        if factory is not None:
            return factory
        why = "a lambda" if name and "<lambda>" in name else "not a top-level function"
        if name and "<locals>" in name:
            why = "a closure (a function defined inside another function)"
        raise self.fail(where, fn, f"it is {why}")

    def _factory_call(self, fn: Any) -> dict | None:
        """An initializer made by a JAX/Flax factory, as the factory and its arguments."""
        code = getattr(fn, "__code__", None)
        module_name = getattr(fn, "__module__", "") or ""
        qualname = getattr(fn, "__qualname__", "") or ""
        if code is None or module_name not in INITIALIZER_FACTORY_MODULES:
            return None
        factory_name, _, rest = qualname.partition(".<locals>.")
        factory = _lookup(module_name, factory_name)
        if not rest or not callable(factory):
            return None
        cells = dict(
            zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True)
        )
        kwargs = {k: self.value(v, qualname) for k, v in cells.items()}
        return {
            TAG: "factory",
            "factory": {"module": module_name, "qualname": factory_name},
            "kwargs": kwargs,
        }


def _is_nnx_node(value: Any) -> bool:
    from flax import nnx

    return isinstance(value, nnx.Pytree)


def _is_nnx_variable(value: Any) -> bool:
    from flax import nnx

    return isinstance(value, nnx.Variable)


def _as_dtype(value: Any) -> np.dtype | None:
    if isinstance(value, np.dtype):
        return value
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value)
    if type(value).__name__ == "_ScalarMeta":  # jnp.float32 and friends
        return np.dtype(value.dtype)
    return None


# ------------------------------------------------------------------------------------ resolve


class Decoder:
    """Rebuilds what `Encoder` captured, under the safe-loading rules of this module."""

    def __init__(self, owner: str, *, safe: bool | None = None):
        self.owner = owner
        self.safe = in_safe_mode() if safe is None else safe
        self.class_modules: set[str] = set()
        self._nodes: dict[int, Any] = {}

    def fail(self, what: str, fix: str) -> SerializationError:
        return SerializationError(f"{self.owner}: cannot load {what}. {fix}")

    def decode(self, data: Any) -> Any:
        # Classes first: functions may come from the Python module of any class being loaded.
        self._resolve_classes(data)
        return self.value(data)

    def _resolve_classes(self, data: Any) -> None:
        if isinstance(data, dict):
            if data.get(TAG) in ("module", "class", "nnx_node", "nnx_variable"):
                self.resolve_class(data["class"])
            for v in data.values():
                self._resolve_classes(v)
        elif isinstance(data, list):
            for v in data:
                self._resolve_classes(v)

    def resolve_class(self, ref: Any) -> type:
        module_name, qualname = self._ref_parts(ref, "a module class")
        if module_name not in sys.modules:
            if self.safe:
                raise self.fail(
                    f"class {qualname!r} from module {module_name!r}",
                    f"That module is not imported, and safe loading never imports what a file "
                    f"names. Import {module_name!r} before loading (`import {module_name}`), or "
                    "pass safe_mode=False to load_model if you trust the file.",
                )
            try:
                importlib.import_module(module_name)
            except ImportError as e:
                raise self.fail(
                    f"class {qualname!r}", f"Importing {module_name!r} failed: {e}."
                ) from e
        cls = _lookup(module_name, qualname)
        if not (isinstance(cls, type) and issubclass(cls, loadable_classes())):
            raise self.fail(
                f"{module_name}.{qualname} as a module class",
                "It is not a Flax module class (a subclass of flax.linen.Module or "
                "flax.nnx.Module, or an NNX Variable type); the file may have been tampered "
                "with.",
            )
        self.class_modules.add(module_name)
        return cls

    def _ref_parts(self, ref: Any, what: str) -> tuple[str, str]:
        if not (
            isinstance(ref, dict)
            and isinstance(ref.get("module"), str)
            and isinstance(ref.get("qualname"), str)
        ):
            raise self.fail(what, f"The reference {ref!r} is malformed; the file is damaged.")
        return ref["module"], ref["qualname"]

    def value(self, data: Any) -> Any:
        if isinstance(data, list):
            return [self.value(v) for v in data]
        if not isinstance(data, dict):
            return data
        kind = data.get(TAG)
        if kind is None:
            return {k: self.value(v) for k, v in data.items()}
        handler = getattr(self, f"_decode_{kind}", None)
        if handler is None:
            raise self.fail(
                f"a value of kind {kind!r}",
                "The file is damaged or was written by a newer flaxlayer.",
            )
        return handler(data)

    def _decode_float(self, data):
        return float(data["value"])

    def _decode_scalar(self, data):
        return np.dtype(data["dtype"]).type(data["value"])

    def _decode_dtype(self, data):
        import jax.numpy as jnp

        return jnp.dtype(data["name"])

    def _decode_class(self, data):
        return self.resolve_class(data["class"])

    def _decode_tuple(self, data):
        return tuple(self.value(v) for v in data["items"])

    def _decode_dict(self, data):
        return {self._hashable(self.value(k)): self.value(v) for k, v in data["items"]}

    def _decode_frozendict(self, data):
        return FrozenDict(self._decode_dict(data))

    @staticmethod
    def _hashable(key):
        return tuple(key) if isinstance(key, list) else key

    def _decode_partial(self, data):
        func = self.value(data["func"])
        if not callable(func):
            raise self.fail("a functools.partial", f"Its function {func!r} is not callable.")
        args = [self.value(v) for v in data.get("args", [])]
        keywords = {k: self.value(v) for k, v in data.get("keywords", {}).items()}
        return functools.partial(func, *args, **keywords)

    def _decode_module(self, data):
        cls = self.resolve_class(data["class"])
        if "custom_config" in data:
            return cls.from_config(data["custom_config"])
        fields = {k: self.value(v) for k, v in data.get("fields", {}).items()}
        init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - set(init_fields))
        if unknown:
            raise self.fail(
                f"{cls.__name__}",
                f"The file gives field(s) {unknown} that {cls.__name__} does not have; the class "
                "changed since the file was saved, or the file is damaged.",
            )
        missing = sorted(
            name
            for name, f in init_fields.items()
            if name not in fields
            and name not in SKIPPED_FIELDS
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise self.fail(
                f"{cls.__name__}",
                f"The file lacks required field(s) {missing}; the class changed since the file "
                "was saved, or the file is damaged.",
            )
        return cls(**fields)

    def _decode_nnx_node(self, data):
        from flax.nnx import graphlib, pytreelib

        cls = self.resolve_class(data["class"])
        if not issubclass(cls, pytreelib.Pytree):
            raise self.fail(f"{cls.__name__} as an NNX node", "It is not an NNX Module.")
        # As NNX itself rebuilds a node in nnx.merge: no __init__, attributes set directly.
        node = object.__new__(cls)
        self._nodes[data["id"]] = node
        object.__setattr__(node, "_pytree__state", pytreelib.PytreeState())
        if data.get("data") is not None:
            object.__setattr__(node, "_pytree__nodes", graphlib.HashableMapping(data["data"]))
        for name, value in data["attributes"].items():
            object.__setattr__(node, name, self.value(value))
        return node

    def _decode_nnx_ref(self, data):
        if data.get("id") not in self._nodes:
            raise self.fail("an NNX module", "It refers to a node the file does not define.")
        return self._nodes[data["id"]]

    def _decode_nnx_variable(self, data):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        cls = self.resolve_class(data["class"])
        if not issubclass(cls, nnx.Variable):
            raise self.fail(f"{cls.__name__} as an NNX Variable", "It is not an NNX Variable.")
        shape = tuple(data["shape"])
        if "key_impl" in data:
            value = jax.random.key(0, impl=data["key_impl"])
            value = jax.random.split(value, shape) if shape else value
        else:
            value = jnp.zeros(shape, data["dtype"])  # the weights file holds the values
        return cls.from_metadata(value, self.value(data["metadata"]))

    def _decode_function(self, data):
        if "registered" in data:
            fn = keras.saving.get_registered_object(data["registered"])
            if fn is None:
                raise self.fail(
                    f"function {data['registered']!r}",
                    "It is not registered. Import the module that registers it with "
                    "@keras.saving.register_keras_serializable(), or pass it in custom_objects.",
                )
            return fn
        module_name, qualname = self._ref_parts(data, "a function")
        # custom_objects given to load_model are keyed by plain name.
        fn = keras.saving.get_registered_object(qualname)
        if callable(fn):
            return fn
        if self.safe and module_name not in sys.modules:
            raise self.fail(
                f"function {module_name}.{qualname}",
                f"Its module is not imported, and safe loading never imports what a file names. "
                f"Import {module_name!r} first, register the function, or pass it in "
                "custom_objects.",
            )
        fn = _lookup(module_name, qualname)
        if not callable(fn) or isinstance(fn, type):
            raise self.fail(
                f"function {module_name}.{qualname}",
                "It is not a function defined there. Import the module that defines it "
                "before loading, register it, or pass it in custom_objects.",
            )
        defined_by_class_module = (
            module_name in self.class_modules and getattr(fn, "__module__", None) == module_name
        )
        if self.safe and not (
            defined_by_class_module or _trusted_function(fn, module_name, qualname)
        ):
            raise self.fail(
                f"function {module_name}.{qualname}",
                "Safe loading only resolves the numerical functions of flax, jax and numpy, "
                "functions registered with Keras or passed in custom_objects, and functions "
                "defined in the Python module of a Flax module class being loaded. Register the "
                "function, pass it in custom_objects, or pass safe_mode=False to load_model if "
                "you trust the file.",
            )
        return fn

    def _decode_factory(self, data):
        module_name, qualname = self._ref_parts(data.get("factory"), "an initializer")
        factory = _lookup(module_name, qualname)
        if module_name not in INITIALIZER_FACTORY_MODULES or not callable(factory):
            raise self.fail(
                f"initializer factory {module_name}.{qualname}",
                "Only the JAX and Flax initializer factories (variance_scaling, normal, "
                "constant, ...) may be called while loading; the file may have been tampered "
                "with.",
            )
        kwargs = {k: self.value(v) for k, v in data.get("kwargs", {}).items()}
        return factory(**kwargs)
