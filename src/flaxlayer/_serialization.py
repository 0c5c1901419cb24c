"""A Flax module's configuration as JSON, and back, under the trust rules of `_trust`.

What is captured: a Linen module's dataclass fields, recursively (submodules, tuples, lists,
dicts, scalars, dtypes, module classes, `functools.partial`, functions, initializers made by
the JAX/Flax factories, and config objects: dataclasses, `flax.struct` dataclasses and Hugging
Face-style configs with `to_dict`/`from_dict`); an NNX module's object graph; a class with its
own `get_config`/`from_config` through those.

Saving refuses what loading would refuse, so a file that saves loads. Loading checks the
whole entry tree first (its shape, every class it names, every config's declared type) before
anything is constructed, never imports in safe mode, allocates nothing sized by the file (NNX
variables come back abstract; values travel in the weights file), and reports every problem as
`SerializationError` with the config path of the entry.
"""

import dataclasses
import functools
import inspect
import math
import sys
import types
import typing
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from flax.core import FrozenDict

from flaxlayer import _trust
from flaxlayer._trust import Refused

TAG = "__flaxlayer__"
SKIPPED_FIELDS = ("parent",)
MAX_DEPTH = 100

# Each kind of entry: the keys it must have, and the keys it may have. Every key of an entry
# is one the loader reads: nothing in a file is looked at by one step and skipped by another.
SCHEMA: dict[str, tuple[frozenset, frozenset]] = {
    kind: (frozenset(required), frozenset(optional))
    for kind, required, optional in (
        ("module", {"class"}, {"fields", "custom_config"}),
        ("nnx_node", {"id", "class", "attributes"}, {"data"}),
        ("nnx_ref", {"id"}, ()),
        ("nnx_variable", {"class", "shape", "metadata"}, {"dtype", "key_impl"}),
        ("config", {"class"}, {"fields", "dict"}),
        ("class", {"class"}, ()),
        ("function", (), {"module", "qualname", "registered"}),
        ("factory", {"factory"}, {"kwargs"}),
        ("partial", {"func"}, {"args", "keywords"}),
        ("tuple", {"items"}, ()),
        ("dict", {"items"}, ()),
        ("frozendict", {"items"}, ()),
        ("dtype", {"name"}, ()),
        ("scalar", {"dtype", "value"}, ()),
        ("float", {"value"}, ()),
    )
}
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
_HOOK_KEYS = ("on_get_value", "on_set_value", "on_create_value", "on_add_axis", "on_remove_axis")


class SerializationError(ValueError):
    """A module or value that cannot be saved, or a `.keras` config that cannot be loaded.

    Raised when saving a field no loader could rebuild (a lambda, a closure, an arbitrary
    object), and for every tampered or inconsistent file, naming the config path of the entry.

    Example:

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from flaxlayer import FlaxLayer, SerializationError
    >>> layer = FlaxLayer(nn.Dense(2, kernel_init=lambda key, shape, dtype: jnp.zeros(shape)))
    >>> try:
    ...     layer.get_config()
    ... except SerializationError as error:
    ...     print("it is a lambda" in str(error))
    True
    """


def module_classes() -> tuple[type, ...]:
    import flax.linen as nn
    from flax import nnx

    return (nn.Module, nnx.Module)


def in_safe_mode() -> bool:
    from flaxlayer._compat import keras_safe_mode

    return keras_safe_mode() is not False


def _ref(cls: Any) -> dict:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


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


def _is_config(value: Any) -> bool:
    """A config object: a dataclass (not a module) or a `to_dict`/`from_dict` class."""
    if isinstance(value, (type, *module_classes())) or _is_nnx_node(value):
        return False
    if dataclasses.is_dataclass(value):
        return True
    return callable(getattr(value, "to_dict", None)) and callable(
        getattr(type(value), "from_dict", None)
    )


# ------------------------------------------------------------------------- declared types


def _registered_name(fn: Any) -> str | None:
    """The name `fn` is registered under with Keras (`package>name`), if it is registered."""
    registered = keras.saving.get_registered_name(fn)
    if (
        registered
        and registered != getattr(fn, "__name__", None)
        and keras.saving.get_registered_object(registered) is fn
    ):
        return registered
    return None


@functools.cache
def declared_types(cls: Any) -> dict[str, Any]:
    """The type each field or attribute of `cls` is declared with (for NNX also `__init__`'s).

    Annotations are resolved in the class's own module; one that cannot be resolved counts as
    undeclared.
    """
    declared: dict[str, Any] = {}
    sources: list[Any] = [cls]
    init = vars(cls).get("__init__") or getattr(cls, "__init__", None)
    if _is_nnx_class(cls) and inspect.isfunction(init):
        sources.insert(0, init)
    for source in sources:
        try:
            hints = typing.get_type_hints(source)
        except Exception:  # an annotation naming something its module lacks
            hints = {}
            for klass in reversed(getattr(source, "__mro__", (source,))):
                for name, annotation in getattr(klass, "__annotations__", {}).items():
                    if isinstance(annotation, str):
                        annotation = _trust.lookup(klass.__module__, annotation)
                    if annotation is not None:
                        hints[name] = annotation
        declared.update(hints)
    return declared


def _is_nnx_class(cls: type) -> bool:
    from flax import nnx

    return isinstance(cls, type) and issubclass(cls, nnx.Pytree)


def config_type(annotation: Any) -> type | None:
    """The class a field declared `T`, `T | None` or `Optional[T]` holds, else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = arms[0] if len(arms) == 1 else None
    if not isinstance(annotation, type) or annotation in (object, typing.Any):
        return None
    return annotation


def module_factory_bound(annotation: Any) -> type | None:
    """M for a field declared `type[M]` or `Callable[..., M]` with M a Flax module class."""
    import collections.abc

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is type and args:
        bound = args[0]
    elif origin is collections.abc.Callable and len(args) == 2:
        bound = args[1]
    else:
        return None
    return bound if isinstance(bound, type) and issubclass(bound, module_classes()) else None


# ------------------------------------------------------------------------------- capture


@dataclasses.dataclass
class _Saved:
    """A function written by module and name, to be checked once the whole tree is known."""

    fn: Callable
    module: str
    where: str


class Encoder:
    """Turns a module (or any field value) into JSON-compatible data; `owner` names the layer.

    Call `finish()` after the last value: it checks that every function written by module and
    name will load (see `_trust`), and warns about classes defined in `__main__`.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._nodes: dict[int, int] = {}
        self._user_modules: set[str] = set()
        self._saved: list[_Saved] = []
        self._main: set[str] = set()

    def fail(self, where: str, value: Any, why: str) -> SerializationError:
        cls, _, field = where.partition(".")
        return SerializationError(
            f"{self.owner}: cannot save field `{field or where}` of {cls}: {why} (value: "
            f"{value!r}). Use a named top-level function or a value of a supported kind "
            "(numbers, strings, tuples, lists, dicts, dtypes, Flax modules, config dataclasses, "
            "flax/jax/numpy functions), register the function with "
            "@keras.saving.register_keras_serializable(), or give "
            f"{cls} get_config() and a classmethod from_config()."
        )

    def module(self, module: Any, where: str | None = None) -> dict:
        cls = type(module)
        where = where or cls.__name__
        if _is_nnx_node(module):
            return self.nnx_node(module, where)
        ref = self.class_ref(cls, where, instantiated=True)
        if callable(getattr(cls, "get_config", None)) and callable(
            getattr(cls, "from_config", None)
        ):
            return {TAG: "module", "class": ref, "custom_config": module.get_config()}
        if not dataclasses.is_dataclass(module):
            raise self.fail(where, module, "it is not a dataclass")
        return {TAG: "module", "class": ref, "fields": self._fields(module, cls)}

    def _fields(self, obj: Any, cls: type) -> dict:
        declared = declared_types(cls)
        fields = {}
        for f in dataclasses.fields(obj):
            if not f.init or f.name in SKIPPED_FIELDS:
                continue
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value is f.default:
                continue
            if f.name == "name" and value is None:
                continue
            fields[f.name] = self.value(
                value, f"{cls.__name__}.{f.name}", declared=declared.get(f.name)
            )
        return fields

    def nnx_node(self, node: Any, where: str) -> dict:
        """An NNX graph node (Module, List, Rngs, ...): its class and attributes, values aside.

        Variables keep their type, shape, dtype and metadata; their values travel in the
        weights file. A node reachable twice is written once and referenced after.
        """
        if id(node) in self._nodes:
            return {TAG: "nnx_ref", "id": self._nodes[id(node)]}
        self._nodes[id(node)] = index = len(self._nodes)
        cls = type(node)
        ref = self.class_ref(cls, where, instantiated=True)
        declared = declared_types(cls)  # type: ignore[arg-type]
        attributes, data = {}, None
        for name, value in vars(node).items():
            if name == "_pytree__state":
                continue
            if name == "_pytree__nodes":
                data = {str(k): bool(v) for k, v in value.items()}
                continue
            attributes[name] = self.value(
                value, f"{cls.__name__}.{name}", declared=declared.get(name)
            )
        return {TAG: "nnx_node", "id": index, "class": ref, "attributes": attributes, "data": data}

    def nnx_variable(self, variable: Any, where: str) -> dict:
        import jax

        value = variable.get_value()
        metadata = {k: v for k, v in variable.get_metadata().items() if k not in _HOOK_KEYS}
        entry = {
            TAG: "nnx_variable",
            "class": self.class_ref(type(variable), where),
            "shape": list(np.shape(value)),
            "metadata": self.value(metadata, where),
        }
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            entry["key_impl"] = str(jax.random.key_impl(value))
        else:
            entry["dtype"] = np.dtype(value.dtype).name
        return entry

    def class_ref(self, cls: type, where: str, *, instantiated: bool = False) -> dict:
        ref = _ref(cls)
        found = _trust.lookup(ref["module"], ref["qualname"])
        if "<locals>" in ref["qualname"] or found is not cls:
            raise SerializationError(
                f"{self.owner}: cannot save {where}: class {cls.__qualname__} is not defined at "
                f"the top level of module {cls.__module__!r}, so it could not be found again "
                "when loading. Define it at the top level of an importable module."
            )
        if ref["module"] == "__main__":
            self._main.add(ref["qualname"])
        if instantiated and not _trust.is_library_module(ref["module"]):
            self._user_modules.add(ref["module"])
        return ref

    def value(self, value: Any, where: str, declared: Any = None) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
        if isinstance(value, np.generic):
            item = value.item()
            if isinstance(item, complex):
                item = [item.real, item.imag]
            return {TAG: "scalar", "dtype": value.dtype.name, "value": item}
        if _is_nnx_variable(value):
            return self.nnx_variable(value, where)
        if isinstance(value, module_classes()) or _is_nnx_node(value):
            return self.module(value, where)
        dtype = _as_dtype(value)
        if dtype is not None:
            return {TAG: "dtype", "name": dtype.name}
        if isinstance(value, type) and issubclass(value, module_classes()):
            return {TAG: "class", "class": self.class_ref(value, where)}
        if _is_config(value):
            return self.config(value, where, declared)
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {TAG: "tuple", "items": [self.value(v, where) for v in value]}
        if isinstance(value, list):
            return [self.value(v, where) for v in value]
        if isinstance(value, (dict, FrozenDict)):
            items = [[self.value(k, where), self.value(v, where)] for k, v in value.items()]
            return {TAG: "frozendict" if isinstance(value, FrozenDict) else "dict", "items": items}
        if isinstance(value, functools.partial):
            if _trust.is_initializer(value.func) or _trust.factory_name(value.func):
                raise self.fail(where, value, "it is a functools.partial of an initializer")
            return {
                TAG: "partial",
                "func": self.value(value.func, where),
                "args": [self.value(v, where) for v in value.args],
                "keywords": {k: self.value(v, where) for k, v in value.keywords.items()},
            }
        if callable(value):
            return self.function(value, where)
        raise self.fail(where, value, f"objects of type {type(value).__qualname__} are not saved")

    def config(self, value: Any, where: str, declared: Any) -> dict:
        cls = type(value)
        expected = config_type(declared)
        owner_cls, _, field = where.partition(".")
        if expected is None or not isinstance(value, expected):
            shown = "no type" if declared is None else f"the type {declared!r}"
            raise SerializationError(
                f"{self.owner}: cannot save field `{field}` of {owner_cls}: it holds a config "
                f"object of class {cls.__qualname__}, but {owner_cls} declares {shown} for it, "
                "and a loader rebuilds a config only as the class the module declares. "
                f"Annotate the field: `{field}: {cls.__qualname__}`."
            )
        ref = self.class_ref(cls, where, instantiated=True)
        if dataclasses.is_dataclass(value):
            return {TAG: "config", "class": ref, "fields": self._fields(value, cls)}
        as_dict = dict(value.to_dict())  # type: ignore[attr-defined]
        return {TAG: "config", "class": ref, "dict": self.value(as_dict, where)}

    def function(self, fn: Any, where: str) -> dict:
        numerical = _trust.numerical_name(fn)
        if numerical is not None:
            allowed_module, allowed_name = _trust.split_name(numerical)
            return {TAG: "function", "module": allowed_module, "qualname": allowed_name}
        registered = _registered_name(fn)
        if registered is not None:
            return {TAG: "function", "registered": registered}
        factory = self._factory_call(fn, where)
        if factory is not None:
            return factory
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        module_name = getattr(fn, "__module__", None)
        if (
            name
            and module_name
            and "." not in name
            and inspect.isfunction(fn)
            and _trust.lookup(module_name, name) is fn
        ):
            self._saved.append(_Saved(fn, module_name, where))
            if module_name == "__main__":
                self._main.add(name)
            return {TAG: "function", "module": module_name, "qualname": name}
        why = "a lambda" if name and "<lambda>" in name else "not a top-level function"
        if name and "<locals>" in name:
            why = "a closure (a function defined inside another function)"
        raise self.fail(where, fn, f"it is {why}")

    def _factory_call(self, fn: Any, where: str) -> dict | None:
        """An initializer made by an allow-listed factory, as the factory and its arguments."""
        code = getattr(fn, "__code__", None)
        module_name = getattr(fn, "__module__", "") or ""
        qualname = getattr(fn, "__qualname__", "") or ""
        factory_qualname, _, rest = qualname.partition(".<locals>.")
        if code is None or not rest:
            return None
        public = _trust.factory_name(_trust.lookup(module_name, factory_qualname))
        if public is None:
            return None
        cells = dict(
            zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True)
        )
        module_name, name = _trust.split_name(public)
        return {
            TAG: "factory",
            "factory": {"module": module_name, "qualname": name},
            "kwargs": {k: self.value(v, where) for k, v in cells.items()},
        }

    def method_function(self, fn: Callable, module_cls: type) -> dict:
        """A `method=` function: registered, or defined next to the module's class."""
        registered = _registered_name(fn)
        if registered is not None:
            return {TAG: "function", "registered": registered}
        name = getattr(fn, "__qualname__", "")
        module_name = getattr(fn, "__module__", None)
        if (
            inspect.isfunction(fn)
            and "." not in name
            and module_name == module_cls.__module__
            and not _trust.is_library_module(module_name)
            and _trust.lookup(module_name, name) is fn
        ):
            if module_name == "__main__":
                self._main.add(name)
            return {TAG: "function", "module": module_name, "qualname": name}
        fn_name = getattr(fn, "__name__", repr(fn))
        raise SerializationError(
            f"{self.owner}: cannot save `method` {name or fn_name!r} (defined in "
            f"{module_name!r}): a loader resolves a method function only if it is registered "
            f"with Keras or defined in the module of {module_cls.__name__} "
            f"({module_cls.__module__!r}), so this file would not load. Register it, one line "
            f"above its definition:\n\n    @keras.saving.register_keras_serializable()\n"
            f"    def {fn_name}(module, inputs, training=False): ..."
        )

    def finish(self) -> None:
        """Checks the functions written by name against what a loader will trust."""
        for saved in self._saved:
            if saved.module in self._user_modules:
                continue
            owner_cls, _, field = saved.where.partition(".")
            name = saved.fn.__name__
            raise SerializationError(
                f"{self.owner}: cannot save field `{field or saved.where}` of {owner_cls}: "
                f"function {name!r} is defined in {saved.module!r}, where no module class "
                "saved with the model is defined, so a loader would refuse it (it resolves a "
                "function by name only next to a class it builds, or from the allowed "
                "numerical functions). Register it, one line above its definition:\n\n"
                f"    @keras.saving.register_keras_serializable()\n    def {name}(...): ..."
            )
        if self._main:
            warnings.warn(
                f"{self.owner}: {', '.join(sorted(self._main))} "
                f"{'is' if len(self._main) == 1 else 'are'} defined in `__main__` (the script "
                "being run), so only a process whose `__main__` defines the same names can "
                "load this file. Move them into a module that both import (e.g. `models.py`).",
                UserWarning,
                stacklevel=4,
            )


# ------------------------------------------------------------------------------- resolve


def _show(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top)"


class Decoder:
    """Rebuilds what `Encoder` captured, under the rules of `_trust`.

    `decode_module` first walks the whole entry tree without constructing anything: it checks
    every entry's keys against `SCHEMA` and its nesting depth, resolves every class it names
    (and checks what its position needs), and records the Python modules of the user classes
    the file instantiates: only their top-level functions may be resolved by name.
    """

    def __init__(self, owner: str, *, safe: bool | None = None, root: tuple = ("module",)):
        self.owner = owner
        self.safe = in_safe_mode() if safe is None else safe
        self.root = root
        self.user_modules: set[str] = set()
        self._classes: dict[int, type] = {}
        self._nodes: dict[int, Any] = {}
        self._node_ids: set[int] = set()
        self._shapes: dict[bool, list[tuple[tuple, tuple]]] = {True: [], False: []}

    def fail(self, path: tuple, what: str) -> SerializationError:
        return SerializationError(f"{self.owner}: cannot load config entry {_show(path)}: {what}")

    # ----------------------------------------------------------------------------- checking

    def decode_module(self, data: Any) -> Any:
        self.check(data, self.root, 0, None)
        self._check_rng_shapes()
        return self.value(data, self.root)

    def _check_rng_shapes(self) -> None:
        """NNX rng state is re-made on every call at its recorded shape, and the weights file
        does not hold it: its shape must be the leading part of a variable's shape that the
        file does hold (keys split for `nnx.vmap`-ed layers), or a scalar."""
        held = [shape for _, shape in self._shapes[False]]
        for path, shape in self._shapes[True]:
            if shape and not any(s[: len(shape)] == shape for s in held):
                raise self.fail(
                    (*path, "shape"),
                    f"an rng state of shape {list(shape)} matches no variable the weights file "
                    "holds (rng keys are scalars, or split along a leading axis of stacked "
                    "layers); the file may have been tampered with.",
                )

    def check(self, data: Any, path: tuple, depth: int, declared: Any) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"it is nested deeper than {MAX_DEPTH} levels.")
        if isinstance(data, list):
            for i, v in enumerate(data):
                self.check(v, (*path, i), depth + 1, None)
            return
        if not isinstance(data, dict):
            if not (data is None or isinstance(data, (bool, int, float, str))):
                raise self.fail(path, f"{type(data).__name__} is not a JSON value.")
            return
        kind = data.get(TAG)
        if kind is None:
            for k, v in data.items():
                self.check(v, (*path, k), depth + 1, None)
            return
        if kind not in SCHEMA:
            raise self.fail(
                path, f"{kind!r} is not a kind of entry flaxlayer writes (a damaged file)."
            )
        required, optional = SCHEMA[kind]
        keys = set(data) - {TAG}
        if not required <= keys or not keys <= required | optional:
            raise self.fail(
                path,
                f"a {kind!r} entry has the keys {sorted(keys)}; it needs {sorted(required)} and "
                f"may have {sorted(optional)}.",
            )
        getattr(self, f"_check_{kind}", self._check_children)(data, path, depth, declared)

    def _check_children(self, data, path, depth, declared) -> None:
        for key in set(data) - {TAG}:
            self.check(data[key], (*path, key), depth + 1, None)

    def _class(self, data: dict, path: tuple, bases: tuple[type, ...], what: str) -> type:
        ref = data["class"]
        if not (
            isinstance(ref, dict)
            and set(ref) == {"module", "qualname"}
            and all(isinstance(ref[k], str) for k in ref)
        ):
            raise self.fail((*path, "class"), f"the class reference {ref!r} is malformed.")
        try:
            cls = _trust.resolve_class(ref["module"], ref["qualname"], safe=self.safe)
        except Refused as e:
            raise self.fail((*path, "class"), str(e)) from None
        if not issubclass(cls, bases):
            names = " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)
            raise self.fail(
                (*path, "class"),
                f"{cls.__module__}.{cls.__qualname__} is not a Flax module class, or not the "
                f"kind this entry needs ({what}: a subclass of {names}); the file may have "
                "been tampered with.",
            )
        self._classes[id(data)] = cls
        return cls

    def _instantiated(self, cls: type) -> None:
        if not _trust.is_library_module(cls.__module__):
            self.user_modules.add(cls.__module__)

    def _check_module(self, data, path, depth, declared) -> None:
        import flax.linen as nn

        cls = self._class(data, path, (nn.Module,), "a Linen module class")
        self._instantiated(cls)
        if "custom_config" in data:
            if not callable(getattr(cls, "from_config", None)):
                raise self.fail(
                    path,
                    f"{cls.__name__} has no classmethod from_config, so it cannot be rebuilt "
                    "from a custom config; the file may have been tampered with.",
                )
            return
        fields = data.get("fields", {})
        if not isinstance(fields, dict):
            raise self.fail((*path, "fields"), "fields must be a mapping.")
        self._check_fields(cls, fields, (*path, "fields"), depth)

    def _check_fields(self, cls: type, fields: dict, path: tuple, depth: int) -> None:
        init_fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - set(init_fields) | set(fields) & set(SKIPPED_FIELDS))
        if unknown:
            raise self.fail(
                path,
                f"the file gives field(s) {unknown} that {cls.__name__} does not take; the "
                "class changed since the file was saved, or the file is damaged.",
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
                path,
                f"the file lacks required field(s) {missing} of {cls.__name__}; the class "
                "changed since the file was saved, or the file is damaged.",
            )
        declared = declared_types(cls)
        for name, value in fields.items():
            self._check_declared(value, (*path, name), depth + 1, declared.get(name))

    def _check_declared(self, value: Any, path: tuple, depth: int, declared: Any) -> None:
        """A field's value, with what the field's declared type demands of it."""
        bound = module_factory_bound(declared)
        if bound is not None and not (isinstance(value, dict) and value.get(TAG) == "class"):
            raise self.fail(
                path,
                f"the field is declared {declared!r}: Flax calls it to create a module, so it "
                "must name a module class; the file gives something else (it may have been "
                "tampered with).",
            )
        self.check(value, path, depth, declared)
        if bound is not None and not issubclass(self._classes[id(value)], bound):
            raise self.fail(
                path,
                f"the class must be a subclass of {bound.__qualname__} (declared {declared!r}).",
            )

    def _check_nnx_node(self, data, path, depth, declared) -> None:
        from flax import nnx

        cls = self._class(data, path, (nnx.Pytree,), "an NNX module or graph node class")
        self._instantiated(cls)
        if not isinstance(data["id"], int) or data["id"] in self._node_ids:
            raise self.fail((*path, "id"), f"node id {data['id']!r} is not a new integer.")
        self._node_ids.add(data["id"])
        attributes, flags = data["attributes"], data.get("data")
        if not isinstance(attributes, dict):
            raise self.fail((*path, "attributes"), "attributes must be a mapping.")
        if flags is not None and not (
            isinstance(flags, dict) and all(isinstance(v, bool) for v in flags.values())
        ):
            raise self.fail((*path, "data"), "data must map attribute names to true/false.")
        node_types = declared_types(cls)
        for name, value in attributes.items():
            if not (name.isidentifier() or name.isdigit()) or name.startswith("__"):
                raise self.fail(
                    (*path, "attributes", name), "not a plain attribute name (tampered file)."
                )
            self._check_declared(
                value, (*path, "attributes", name), depth + 1, node_types.get(name)
            )

    def _check_nnx_ref(self, data, path, depth, declared) -> None:
        if data["id"] not in self._node_ids:
            raise self.fail(path, "it refers to an NNX node the file does not define before it.")

    def _check_nnx_variable(self, data, path, depth, declared) -> None:
        from flax import nnx

        cls = self._class(data, path, (nnx.Variable,), "an NNX Variable type")
        shape = data["shape"]
        if not (
            isinstance(shape, list)
            and len(shape) <= 32
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise self.fail((*path, "shape"), f"{shape!r} is not a shape (a list of sizes).")
        self._shapes[issubclass(cls, nnx.RngState)].append((path, tuple(shape)))
        if ("dtype" in data) == ("key_impl" in data):
            raise self.fail(path, "a variable entry needs exactly one of dtype and key_impl.")
        if "dtype" in data:
            self._dtype(data["dtype"], (*path, "dtype"))
        elif data["key_impl"] not in _KEY_IMPLS:
            raise self.fail((*path, "key_impl"), f"{data['key_impl']!r} is not a JAX key type.")
        self._check_plain(data["metadata"], (*path, "metadata"), depth + 1)

    def _check_plain(self, data: Any, path: tuple, depth: int) -> None:
        """Variable metadata: plain data only (no functions, classes or hooks)."""
        if depth > MAX_DEPTH:
            raise self.fail(path, f"it is nested deeper than {MAX_DEPTH} levels.")
        if isinstance(data, list):
            for i, v in enumerate(data):
                self._check_plain(v, (*path, i), depth + 1)
            return
        if not isinstance(data, dict):
            self.check(data, path, depth, None)
            return
        kind = data.get(TAG)
        if kind in ("float", "dtype"):
            self.check(data, path, depth, None)
            return
        if kind is None:
            pairs = [[k, v] for k, v in data.items()]
        elif kind in ("tuple", "dict", "frozendict") and set(data) == {TAG, "items"}:
            pairs = data["items"] if kind != "tuple" else [[None, v] for v in data["items"]]
            if not isinstance(pairs, list):
                raise self.fail(path, "items must be a list.")
        else:
            raise self.fail(path, f"variable metadata holds only plain data, not {kind!r}.")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.fail((*path, "items", i), "not a [key, value] pair.")
            if pair[0] in _HOOK_KEYS:
                raise self.fail((*path, "items", i), f"variable hooks ({pair[0]}) are not loaded.")
            self._check_plain(pair[0], (*path, "items", i, 0), depth + 1)
            self._check_plain(pair[1], (*path, "items", i, 1), depth + 1)

    def _check_config(self, data, path, depth, declared) -> None:
        expected = config_type(declared)
        if expected is None:
            raise self.fail(
                path,
                "a config object may only be the value of a field whose class declares its "
                "type, and this one declares none (the file may have been tampered with).",
            )
        cls = self._class(data, path, (expected,), f"a {expected.__qualname__} config")
        self._instantiated(cls)
        if ("fields" in data) == ("dict" in data):
            raise self.fail(path, "a config entry needs exactly one of fields and dict.")
        if "fields" in data:
            if not dataclasses.is_dataclass(cls) or not isinstance(data["fields"], dict):
                raise self.fail(path, f"{cls.__qualname__} is not a dataclass with fields.")
            self._check_fields(cls, data["fields"], (*path, "fields"), depth)
        else:
            if not callable(getattr(cls, "from_dict", None)):
                raise self.fail(path, f"{cls.__qualname__} has no from_dict.")
            self.check(data["dict"], (*path, "dict"), depth + 1, None)

    def _check_class(self, data, path, depth, declared) -> None:
        from flax import nnx

        self._class(
            data, path, (*module_classes(), nnx.Variable), "a Flax module or Variable class"
        )

    def _dtype(self, name: Any, path: tuple) -> Any:
        try:
            return _trust.dtype_from_name(name)
        except Refused as e:
            raise self.fail(path, str(e)) from None

    def _check_dtype(self, data, path, depth, declared) -> None:
        self._dtype(data["name"], (*path, "name"))

    def _check_scalar(self, data, path, depth, declared) -> None:
        dtype = self._dtype(data["dtype"], (*path, "dtype"))
        value = data["value"]
        if dtype.kind == "c":
            ok = isinstance(value, list) and len(value) == 2
            ok = ok and all(isinstance(v, (int, float)) for v in value)
        else:
            ok = isinstance(value, (bool, int, float))
        if not ok:
            raise self.fail((*path, "value"), f"{value!r} is not a number of dtype {dtype}.")

    def _check_float(self, data, path, depth, declared) -> None:
        if data["value"] not in ("inf", "-inf", "nan"):
            raise self.fail((*path, "value"), f"{data['value']!r} is not inf, -inf or nan.")

    def _check_function(self, data, path, depth, declared) -> None:
        keys = set(data) - {TAG}
        if keys not in ({"registered"}, {"module", "qualname"}) or not all(
            isinstance(data[k], str) for k in keys
        ):
            raise self.fail(path, "a function is named by module and qualname, or registered.")

    def _check_factory(self, data, path, depth, declared) -> None:
        ref = data["factory"]
        if not (isinstance(ref, dict) and set(ref) == {"module", "qualname"}):
            raise self.fail((*path, "factory"), f"{ref!r} is not a factory reference.")
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise self.fail((*path, "kwargs"), "kwargs must be a mapping.")
        for k, v in kwargs.items():
            self.check(v, (*path, "kwargs", k), depth + 1, None)

    def _check_partial(self, data, path, depth, declared) -> None:
        self.check(data["func"], (*path, "func"), depth + 1, None)
        args, keywords = data.get("args", []), data.get("keywords", {})
        if not isinstance(args, list) or not isinstance(keywords, dict):
            raise self.fail(path, "a partial's args must be a list and keywords a mapping.")
        self.check(args, (*path, "args"), depth + 1, None)
        for k, v in keywords.items():
            if not k.isidentifier():
                raise self.fail((*path, "keywords"), f"{k!r} is not a keyword name.")
            self.check(v, (*path, "keywords", k), depth + 1, None)

    def _check_tuple(self, data, path, depth, declared) -> None:
        if not isinstance(data["items"], list):
            raise self.fail((*path, "items"), "items must be a list.")
        self.check(data["items"], (*path, "items"), depth + 1, None)

    def _check_dict(self, data, path, depth, declared) -> None:
        items = data["items"]
        if not isinstance(items, list) or not all(
            isinstance(i, list) and len(i) == 2 for i in items
        ):
            raise self.fail((*path, "items"), "items must be a list of [key, value] pairs.")
        self.check(items, (*path, "items"), depth + 1, None)

    _check_frozendict = _check_dict

    # ---------------------------------------------------------------------------- building

    def value(self, data: Any, path: tuple) -> Any:
        if isinstance(data, list):
            return [self.value(v, (*path, i)) for i, v in enumerate(data)]
        if not isinstance(data, dict):
            return data
        kind = data.get(TAG)
        if kind is None:
            return {k: self.value(v, (*path, k)) for k, v in data.items()}
        return getattr(self, f"_decode_{kind}")(data, path)

    def _construct(self, path: tuple, build: Callable[[], Any], what: str) -> Any:
        try:
            return build()
        except SerializationError:
            raise
        except Exception as e:  # the class's own code refused the file's values
            raise self.fail(path, f"{what} failed: {type(e).__name__}: {e}") from e

    def _decode_float(self, data, path):
        return float(data["value"])

    def _decode_scalar(self, data, path):
        dtype = self._dtype(data["dtype"], path)
        value = complex(*data["value"]) if dtype.kind == "c" else data["value"]
        return self._construct(path, lambda: dtype.type(value), f"a {dtype} scalar")

    def _decode_dtype(self, data, path):
        return self._dtype(data["name"], path)

    def _decode_class(self, data, path):
        return self._classes[id(data)]

    def _decode_tuple(self, data, path):
        return tuple(self.value(v, (*path, "items", i)) for i, v in enumerate(data["items"]))

    def _decode_dict(self, data, path):
        items = {}
        for i, (k, v) in enumerate(data["items"]):
            key = self.value(k, (*path, "items", i, 0))
            key = tuple(key) if isinstance(key, list) else key
            try:
                items[key] = self.value(v, (*path, "items", i, 1))
            except TypeError:
                raise self.fail((*path, "items", i), f"{key!r} cannot be a dict key.") from None
        return items

    def _decode_frozendict(self, data, path):
        return FrozenDict(self._decode_dict(data, path))

    def _decode_partial(self, data, path):
        func = self.value(data["func"], (*path, "func"))
        if _trust.is_initializer(func) or not callable(func):
            raise self.fail((*path, "func"), f"{func!r} cannot be wrapped in a partial.")
        args = [self.value(v, (*path, "args", i)) for i, v in enumerate(data.get("args", []))]
        keywords = {
            k: self.value(v, (*path, "keywords", k)) for k, v in data.get("keywords", {}).items()
        }
        return functools.partial(func, *args, **keywords)

    def _fields_of(self, data: dict, path: tuple) -> dict:
        return {k: self.value(v, (*path, "fields", k)) for k, v in data.get("fields", {}).items()}

    def _decode_module(self, data, path):
        cls = self._classes[id(data)]
        if "custom_config" in data:
            config = data["custom_config"]
            return self._construct(
                path, lambda: cls.from_config(config), f"{cls.__name__}.from_config"
            )
        fields = self._fields_of(data, path)
        return self._construct(path, lambda: cls(**fields), f"constructing {cls.__name__}")

    def _decode_config(self, data, path):
        cls = self._classes[id(data)]
        if "fields" in data:
            fields = self._fields_of(data, path)
            return self._construct(path, lambda: cls(**fields), f"constructing {cls.__name__}")
        values = self.value(data["dict"], (*path, "dict"))
        if not isinstance(values, dict):
            raise self.fail((*path, "dict"), "a config's dict must be a mapping.")
        return self._construct(path, lambda: cls.from_dict(values), f"{cls.__name__}.from_dict")

    def _decode_nnx_node(self, data, path):
        from flax.nnx import graphlib, pytreelib

        cls = self._classes[id(data)]
        # As NNX itself rebuilds a node in nnx.merge: no __init__, attributes set directly.
        node = object.__new__(cls)
        self._nodes[data["id"]] = node
        object.__setattr__(node, "_pytree__state", pytreelib.PytreeState())
        if data.get("data") is not None:
            object.__setattr__(node, "_pytree__nodes", graphlib.HashableMapping(data["data"]))
        for name, value in data["attributes"].items():
            object.__setattr__(node, name, self.value(value, (*path, "attributes", name)))
        return node

    def _decode_nnx_ref(self, data, path):
        return self._nodes[data["id"]]

    def _decode_nnx_variable(self, data, path):
        import jax

        cls = self._classes[id(data)]
        shape = tuple(data["shape"])
        if "key_impl" in data:
            impl = data["key_impl"]
            value = jax.eval_shape(
                lambda: (
                    jax.random.split(jax.random.key(0, impl=impl), shape)
                    if shape
                    else jax.random.key(0, impl=impl)
                )
            )
        else:
            # Abstract: the weights file holds the values, checked against this shape.
            value = jax.ShapeDtypeStruct(shape, self._dtype(data["dtype"], path))
        metadata = self.value(data["metadata"], (*path, "metadata"))
        return self._construct(
            path, lambda: cls.from_metadata(value, metadata), f"an NNX {cls.__name__}"
        )

    def _decode_function(self, data, path, *, numerical: bool = True):
        if "registered" in data:
            fn = keras.saving.get_registered_object(data["registered"])
            if not callable(fn) or isinstance(fn, type):
                raise self.fail(
                    path,
                    f"function {data['registered']!r} is not registered. Import the module that "
                    "registers it with @keras.saving.register_keras_serializable(), or pass it "
                    "in custom_objects.",
                )
            return fn
        module_name, qualname = data["module"], data["qualname"]
        shown = f"{module_name}.{qualname}"
        # custom_objects given to load_model are keyed by plain name.
        fn = keras.saving.get_registered_object(qualname)
        if callable(fn) and not isinstance(fn, type):
            return fn
        if not self.safe:  # the user trusts the file: import and resolve as named
            if module_name not in sys.modules:
                import importlib

                try:
                    importlib.import_module(module_name)
                except ImportError as e:
                    raise self.fail(path, f"importing {module_name!r} failed: {e}") from e
            fn = _trust.lookup(module_name, qualname)
            if callable(fn) and not isinstance(fn, type):
                return fn
            raise self.fail(path, f"{shown} is not a function defined there.")
        fn = _trust.lookup(module_name, qualname)
        if numerical and _trust.numerical_name(fn) is not None:
            return fn
        if (
            inspect.isfunction(fn)
            and "." not in qualname
            and fn.__module__ == module_name
            and module_name in self.user_modules
        ):
            return fn
        if module_name not in sys.modules:
            why = (
                f"its module {module_name!r} is not imported, and safe loading never imports "
                f"what a file names. Import {module_name!r} first, register the function, or "
                "pass it in custom_objects."
            )
        else:
            why = (
                "Safe loading resolves only the allowed numerical functions of jax, flax and "
                "numpy (activations, initializers, elementwise and reduction functions), "
                "functions registered with Keras or passed in custom_objects, and top-level "
                "functions of the module that defines a class the file builds. Register it, "
                "pass it in custom_objects, or pass safe_mode=False to load_model if you trust "
                "the file."
            )
        raise self.fail(path, f"function {shown} is refused. {why}")

    def decode_method_function(self, data: Any, path: tuple) -> Callable:
        """A `method=` function: registered, or defined next to a class the file builds."""
        self.check(data, path, 0, None)
        if not (isinstance(data, dict) and data.get(TAG) == "function"):
            raise self.fail(path, "a method function must be a function entry.")
        return self._decode_function(data, path, numerical=False)

    def _decode_factory(self, data, path):
        ref = data["factory"]
        factory = _trust.lookup(ref["module"], ref["qualname"])
        if _trust.factory_name(factory) is None:
            raise self.fail(
                (*path, "factory"),
                f"{ref['module']}.{ref['qualname']} is not an initializer factory: only the JAX "
                "and Flax initializer factories (variance_scaling, normal, constant, ...) may be "
                "called while loading; the file may have been tampered with.",
            )
        kwargs = {k: self.value(v, (*path, "kwargs", k)) for k, v in data.get("kwargs", {}).items()}
        made = self._construct(path, lambda: factory(**kwargs), f"{ref['qualname']}(...)")
        if not callable(made):
            raise self.fail(path, f"{ref['qualname']}(...) did not make an initializer.")
        return made
