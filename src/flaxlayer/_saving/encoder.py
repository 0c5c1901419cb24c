"""Writes a module (or any field value) as JSON-compatible entries, refusing what would not load.

What is captured: a Linen module's dataclass fields, recursively (submodules, tuples, lists,
dicts, scalars, dtypes, module classes, `functools.partial`, functions, initializers made by
the JAX/Flax factories, config objects: dataclasses, `flax.struct` dataclasses and Hugging
Face-style configs with `to_dict`/`from_dict`, and enum members by class and name); an NNX
module's object graph; a class with its own `get_config`/`from_config` through those.

A config object's class must be the one its field declares or a subclass, or a sibling of it
(`_trust.are_siblings`: one top-level package, every direct base of the declared class a base
of it and defined in that package); in a field declared loosely (`object`, `Any`, no type) it
must be defined in the Python module of a Flax module class of yours the model saves. An enum
member's class must be named by the field's annotation (anywhere in it) or be defined in the
module of such a module class. An `int`/`str`/`float` enum whose class the annotation does
not name is written as its plain value, as before. What a module kind writes of its own objects
(a Linen module's fields, an NNX object graph) its adapter says, through a `KindCodec`.
Saving refuses what loading would refuse, so a file that saves loads.
"""

import dataclasses
import enum
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from flax.core import FrozenDict

from flaxlayer import _trust
from flaxlayer._compat import jax_scalar_type_dtype
from flaxlayer._saving.codec import KindCodec
from flaxlayer._saving.errors import SerializationError
from flaxlayer._saving.schema import (
    SKIPPED_FIELDS,
    TAG,
    config_type,
    declared_types,
    enum_types,
    is_loose,
    item_type,
)


def _ref(cls: Any) -> dict:
    return {"module": cls.__module__, "qualname": cls.__qualname__}


def _is_config(value: Any) -> bool:
    """A config object: a dataclass or a `to_dict`/`from_dict` class (modules are asked first)."""
    if isinstance(value, type):
        return False
    if dataclasses.is_dataclass(value):
        return True
    return callable(getattr(value, "to_dict", None)) and callable(
        getattr(type(value), "from_dict", None)
    )


def _config_dict(value: Any) -> dict:
    """What a `to_dict`/`from_dict` config object's `to_dict` gives, as a dict."""
    return dict(value.to_dict())


def _as_dtype(value: Any) -> np.dtype | None:
    if isinstance(value, np.dtype):
        return value
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value)
    scalar_type_dtype = jax_scalar_type_dtype(value)
    if scalar_type_dtype is not None:
        return np.dtype(scalar_type_dtype)
    return None


def _number(value: float | np.generic) -> Any:
    """A float (an entry for inf and nan) or a NumPy scalar entry."""
    if isinstance(value, float):
        return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
    item = value.item()
    if isinstance(item, complex):
        item = [item.real, item.imag]
    return {TAG: "scalar", "dtype": value.dtype.name, "value": item}


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


@dataclasses.dataclass
class _Beside:
    """A config object or enum member whose class must be defined in the module of a Flax module
    class of yours the model saves (checked once the whole tree is known)."""

    cls: type
    where: str
    what: str
    declared: Any


def _names_enum(declared: Any, cls: type) -> bool:
    return any(issubclass(cls, e) for e in enum_types(declared))


def _as_member(value: Any, declared: Any) -> bool:
    """Whether `value` is written as an enum member (an int, str or float enum only where the
    annotation names its class: elsewhere it stays the plain value it always was)."""
    return isinstance(value, enum.Enum) and (
        not isinstance(value, (int, float, str)) or _names_enum(declared, type(value))
    )


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

    def __init__(self, owner: str, kinds: Sequence[type[KindCodec]]):
        self.owner = owner
        self.codecs = [kind(self) for kind in kinds]
        self._class_bases = tuple(b for kind in kinds for b in kind.class_bases)
        self._module_bases = tuple(kind.module_base for kind in kinds)
        self._user_modules: set[str] = set()
        self._module_modules: set[str] = set()  # of the user module classes saved
        self._saved: list[_Saved] = []
        self._beside: list[_Beside] = []
        self._main: set[str] = set()

    def fail(self, where: str, value: Any, why: str) -> SerializationError:
        """The error for a field value that cannot be saved, with what can be."""
        cls, _, field = where.partition(".")
        return SerializationError(
            f"{self.owner}: cannot save field `{field or where}` of {cls}: {why} (value: "
            f"{value!r}). Use a named top-level function or a value of a supported kind "
            "(numbers, strings, tuples, lists, dicts, dtypes, Flax modules, config dataclasses, "
            "flax/jax/numpy functions), register the function with "
            "@keras.saving.register_keras_serializable(), or give "
            f"{cls} get_config() and a classmethod from_config()."
        )

    def codec_for(self, value: Any) -> KindCodec | None:
        return next((c for c in self.codecs if c.encodes(value)), None)

    def module(self, module: Any, where: str | None = None) -> dict:
        """The entry for a module of one of the kinds this encoder was given."""
        where = where or type(module).__name__
        codec = self.codec_for(module)
        if codec is None:
            raise self.fail(where, module, "it is not a module of a kind flaxlayer wraps")
        return codec.encode(module, where)

    def fields(self, obj: Any, cls: type) -> dict:
        """A dataclass's init fields that differ from their defaults, as entries."""
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

    def class_ref(self, cls: type, where: str, *, instantiated: bool = False) -> dict:
        """A reference to `cls` by module and name; it must be found there again."""
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
            if issubclass(cls, self._module_bases):
                self._module_modules.add(ref["module"])
        return ref

    def value(self, value: Any, where: str, declared: Any = None) -> Any:
        """The entry for a field value (`declared`: the type the field declares)."""
        if _as_member(value, declared):
            return self.enum(value, where, declared)
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, (float, np.generic)):
            return _number(value)
        codec = self.codec_for(value)
        if codec is not None:
            return codec.encode(value, where)
        dtype = _as_dtype(value)
        if dtype is not None:
            return {TAG: "dtype", "name": dtype.name}
        if isinstance(value, type) and issubclass(value, self._class_bases):
            return {TAG: "class", "class": self.class_ref(value, where)}
        if _is_config(value):
            return self.config(value, where, declared)
        return self._composite(value, where, declared)

    def _items(self, value: tuple | list, where: str, declared: Any) -> list:
        return [self.value(v, where, item_type(declared, i)) for i, v in enumerate(value)]

    def _composite(self, value: Any, where: str, declared: Any = None) -> Any:
        """The entry for a container, a partial or a function (what `value` leaves)."""
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {TAG: "tuple", "items": self._items(value, where, declared)}
        if isinstance(value, list):
            return self._items(value, where, declared)
        if isinstance(value, (dict, FrozenDict)):
            items = [[self.value(k, where), self.value(v, where)] for k, v in value.items()]
            return {TAG: "frozendict" if isinstance(value, FrozenDict) else "dict", "items": items}
        if isinstance(value, functools.partial):
            return self._partial(value, where)
        if callable(value):
            return self.function(value, where)
        raise self.fail(where, value, f"objects of type {type(value).__qualname__} are not saved")

    def _partial(self, value: functools.partial, where: str) -> dict:
        if _trust.is_initializer(value.func) or _trust.factory_name(value.func):
            raise self.fail(where, value, "it is a functools.partial of an initializer")
        return {
            TAG: "partial",
            "func": self.value(value.func, where),
            "args": [self.value(v, where) for v in value.args],
            "keywords": {k: self.value(v, where) for k, v in value.keywords.items()},
        }

    def config(self, value: Any, where: str, declared: Any) -> dict:
        """A config object's entry: of the declared class, a subclass or a sibling of it; in a
        loosely declared field, of a class beside a module class saved (checked by `finish`)."""
        cls = type(value)
        expected = config_type(declared)
        if expected is not None and (
            isinstance(value, expected) or _trust.are_siblings(cls, expected)
        ):
            pass
        elif is_loose(declared):
            self._beside.append(_Beside(cls, where, "config object", declared))
        else:
            owner_cls, _, field = where.partition(".")
            raise SerializationError(
                f"{self.owner}: cannot save field `{field}` of {owner_cls}: it holds a config "
                f"object of class {cls.__qualname__}, but {owner_cls} declares the type "
                f"{declared!r} for it, and a loader rebuilds a config only as the class the "
                "module declares, a subclass of it, or a sibling (a class of the same package "
                "under the same parent classes). "
                f"Annotate the field: `{field}: {cls.__qualname__}`."
            )
        ref = self.class_ref(cls, where, instantiated=True)
        if dataclasses.is_dataclass(value):
            return {TAG: "config", "class": ref, "fields": self.fields(value, cls)}
        return {TAG: "config", "class": ref, "dict": self.value(_config_dict(value), where)}

    def enum(self, value: enum.Enum, where: str, declared: Any) -> dict:
        """An enum member's entry: its class (named by the annotation, or beside a module class
        saved, checked by `finish`) and its name."""
        cls = type(value)
        try:
            loads = _trust.enum_member(cls, value.name) is value
        except _trust.Refused:
            loads = False
        if not loads:
            raise self.fail(
                where, value, f"{cls.__qualname__} does not look its members up by name"
            )
        ref = self.class_ref(cls, where)
        if not _names_enum(declared, cls):
            self._beside.append(_Beside(cls, where, "enum member", declared))
        return {TAG: "enum", "class": ref, "name": value.name}

    def function(self, fn: Any, where: str) -> dict:
        """A function's entry: allow-listed, registered, made by a factory, or top-level."""
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
        return self._top_level_function(fn, where)

    def _top_level_function(self, fn: Any, where: str) -> dict:
        """A function by module and name, checked by `finish` against the classes saved."""
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
            if saved.module not in self._user_modules:
                raise self._untrusted(saved)
        for beside in self._beside:
            if beside.cls.__module__ not in self._module_modules:
                raise self._not_beside(beside)
        if self._main:
            warnings.warn(
                f"{self.owner}: {', '.join(sorted(self._main))} "
                f"{'is' if len(self._main) == 1 else 'are'} defined in `__main__` (the script "
                "being run), so only a process whose `__main__` defines the same names can "
                "load this file. Move them into a module that both import (e.g. `models.py`).",
                UserWarning,
                stacklevel=4,
            )

    def _untrusted(self, saved: _Saved) -> SerializationError:
        """The error for a function a loader would refuse: no saved class shares its module."""
        owner_cls, _, field = saved.where.partition(".")
        name = saved.fn.__name__
        return SerializationError(
            f"{self.owner}: cannot save field `{field or saved.where}` of {owner_cls}: "
            f"function {name!r} is defined in {saved.module!r}, where no module class "
            "saved with the model is defined, so a loader would refuse it (it resolves a "
            "function by name only next to a class it builds, or from the allowed "
            "numerical functions). Register it, one line above its definition:\n\n"
            f"    @keras.saving.register_keras_serializable()\n    def {name}(...): ..."
        )

    def _not_beside(self, beside: _Beside) -> SerializationError:
        """The error for a config or enum class a loader would refuse in this field."""
        owner_cls, _, field = beside.where.partition(".")
        cls = beside.cls
        shown = "no type" if beside.declared is None else f"the type {beside.declared!r}"
        modules = ", ".join(repr(m) for m in sorted(self._module_modules)) or "none"
        return SerializationError(
            f"{self.owner}: cannot save field `{field or beside.where}` of {owner_cls}: it holds "
            f"a{'n' if beside.what[0] in 'ae' else ''} {beside.what} of class {cls.__qualname__} "
            f"(defined in {cls.__module__!r}), but {owner_cls} declares {shown} for it, and a "
            f"loader accepts a class the field does not declare only if it is defined in the "
            f"module of a Flax module class of yours the model saves (here: {modules}). "
            f"Annotate the field: `{field or beside.where}: {cls.__qualname__}`, or define "
            f"{cls.__qualname__} in the module of the module class that uses it."
        )
