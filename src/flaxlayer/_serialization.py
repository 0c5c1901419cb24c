"""A Flax module's configuration as JSON, and back, under the trust rules of `_trust`.

What is captured: a Linen module's dataclass fields, recursively (submodules, tuples, lists,
dicts, scalars, dtypes, module classes, `functools.partial`, functions, initializers made by
the JAX/Flax factories, and config objects: dataclasses, `flax.struct` dataclasses and Hugging
Face-style configs with `to_dict`/`from_dict`); an NNX module's object graph; a class with its
own `get_config`/`from_config` through those. What a module kind writes of its own objects
(a Linen module's fields, an NNX object graph) its adapter says, through a `KindCodec`.

Saving refuses what loading would refuse, so a file that saves loads. Loading checks the
whole entry tree first (its shape, every class it names, every config's declared type) before
anything is constructed, never imports in safe mode, allocates nothing sized by the file (NNX
variables come back abstract; values travel in the weights file), and reports every problem as
`SerializationError` with the config path of the entry.
"""

import abc
import dataclasses
import functools
import inspect
import math
import sys
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import keras
import numpy as np
from flax.core import FrozenDict

from flaxlayer import _trust
from flaxlayer._trust import Refused

TAG = "__flaxlayer__"
SKIPPED_FIELDS = ("parent",)
MAX_DEPTH = 100

#: An entry's keys: those it must have, and those it may have.
Keys = tuple[frozenset, frozenset]


def schema(*entries: tuple[str, Any, Any]) -> dict[str, Keys]:
    """`{kind: (required keys, optional keys)}` from `(kind, required, optional)` triples."""
    return {kind: (frozenset(needed), frozenset(allowed)) for kind, needed, allowed in entries}


# Each kind of entry a module kind's codec does not own. Every key of an entry is one the
# loader reads: nothing in a file is looked at by one step and skipped by another.
SCHEMA = schema(
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


def in_safe_mode() -> bool:
    from flaxlayer._compat import keras_safe_mode

    return keras_safe_mode() is not False


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


def _as_dtype(value: Any) -> np.dtype | None:
    if isinstance(value, np.dtype):
        return value
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value)
    if type(value).__name__ == "_ScalarMeta":  # jnp.float32 and friends
        return np.dtype(value.dtype)
    return None


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
def declared_types(cls: Any, *, with_init: bool = False) -> dict[str, Any]:
    """The type each field or attribute of `cls` is declared with (and, `with_init`, each
    argument of its `__init__`: how a non-dataclass such as an NNX module declares them).

    Annotations are resolved in the class's own module; one that cannot be resolved counts as
    undeclared.
    """
    declared: dict[str, Any] = {}
    sources: list[Any] = [cls]
    init = vars(cls).get("__init__") or getattr(cls, "__init__", None)
    if with_init and inspect.isfunction(init):
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


def config_type(annotation: Any) -> type | None:
    """The class a field declared `T`, `T | None` or `Optional[T]` holds, else None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = arms[0] if len(arms) == 1 else None
    if not isinstance(annotation, type) or annotation in (object, typing.Any):
        return None
    return annotation


def module_factory_bound(annotation: Any, bases: tuple[type, ...]) -> type | None:
    """M for a field declared `type[M]` or `Callable[..., M]` with M a subclass of `bases`."""
    import collections.abc

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is type and args:
        bound = args[0]
    elif origin is collections.abc.Callable and len(args) == 2:
        bound = args[1]
    else:
        return None
    return bound if isinstance(bound, type) and issubclass(bound, bases) else None


# ------------------------------------------------------------------------ module kinds


class KindCodec(abc.ABC):
    """What one module kind (Linen, NNX) writes of its own objects, and how it reads them back.

    Each adapter module defines one; `Encoder` and `Decoder` ask the codecs they are given for
    every value and entry kind they do not handle themselves. A codec is made per `Encoder` or
    `Decoder` (it may keep state across one file, such as the NNX node ids seen) and uses the
    public methods of the coder it is given: `value`, `class_ref`, `fields` when saving;
    `check`, `check_class`, `check_fields`, `check_declared`, `value`, `construct`, `fail`
    when loading. Loading checks an entry completely (`check`, nothing constructed) before
    `decode` builds it.
    """

    #: The entry kinds this codec writes, with their keys (see `schema`).
    entries: ClassVar[Mapping[str, Keys]]
    #: Classes whose subclasses may be written as a class (a field holding a module class).
    class_bases: ClassVar[tuple[type, ...]]
    #: The module base class: what a `type[M]` or `Callable[..., M]` field may be bound to.
    module_base: ClassVar[type]

    def __init__(self, coder: Any):
        self.coder = coder

    @classmethod
    @abc.abstractmethod
    def encodes(cls, value: Any) -> bool:
        """Whether `value` is an object of this kind (a module, a graph node, a variable)."""

    @abc.abstractmethod
    def encode(self, value: Any, where: str) -> dict:
        """The entry for `value` (`where` names the field, for messages)."""

    @abc.abstractmethod
    def check(self, data: dict, path: tuple, depth: int, declared: Any) -> None:
        """Checks an entry of one of `entries` (keys already checked) without building it."""

    @abc.abstractmethod
    def decode(self, data: dict, path: tuple) -> Any:
        """Builds a checked entry."""

    def finish_check(self) -> None:  # noqa: B027 (most kinds have nothing to add)
        """Checks what only the whole file shows, after every entry is checked."""


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

    def __init__(self, owner: str, kinds: Sequence[type[KindCodec]]):
        self.owner = owner
        self.codecs = [kind(self) for kind in kinds]
        self._class_bases = tuple(b for kind in kinds for b in kind.class_bases)
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
            return {TAG: "config", "class": ref, "fields": self.fields(value, cls)}
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

    def __init__(
        self,
        owner: str,
        kinds: Sequence[type[KindCodec]],
        *,
        safe: bool | None = None,
        root: tuple = ("module",),
    ):
        self.owner = owner
        self.safe = in_safe_mode() if safe is None else safe
        self.root = root
        self.user_modules: set[str] = set()
        self.codecs = [kind(self) for kind in kinds]
        self._schema = dict(SCHEMA)
        self._owners: dict[str, KindCodec] = {}
        for codec in self.codecs:
            self._schema.update(codec.entries)
            self._owners.update(dict.fromkeys(codec.entries, codec))
        self._class_bases = tuple(b for kind in kinds for b in kind.class_bases)
        self.module_bases = tuple(kind.module_base for kind in kinds)
        self._classes: dict[int, type] = {}

    def fail(self, path: tuple, what: str) -> SerializationError:
        return SerializationError(f"{self.owner}: cannot load config entry {_show(path)}: {what}")

    # ----------------------------------------------------------------------------- checking

    def decode_module(self, data: Any) -> Any:
        self.check(data, self.root, 0, None)
        for codec in self.codecs:
            codec.finish_check()
        return self.value(data, self.root)

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
        if kind not in self._schema:
            raise self.fail(
                path, f"{kind!r} is not a kind of entry flaxlayer writes (a damaged file)."
            )
        required, optional = self._schema[kind]
        keys = set(data) - {TAG}
        if not required <= keys or not keys <= required | optional:
            raise self.fail(
                path,
                f"a {kind!r} entry has the keys {sorted(keys)}; it needs {sorted(required)} and "
                f"may have {sorted(optional)}.",
            )
        if kind in self._owners:
            self._owners[kind].check(data, path, depth, declared)
        else:
            getattr(self, f"_check_{kind}", self._check_children)(data, path, depth, declared)

    def _check_children(self, data, path, depth, declared) -> None:
        for key in set(data) - {TAG}:
            self.check(data[key], (*path, key), depth + 1, None)

    def check_class(self, data: dict, path: tuple, bases: tuple[type, ...], what: str) -> type:
        """Resolves the class an entry names (under `_trust`); it must subclass `bases`."""
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

    def class_of(self, data: dict) -> type:
        """The class `check_class` resolved for `data`."""
        return self._classes[id(data)]

    def instantiated(self, cls: type) -> None:
        """Records that the file builds `cls`: its module's top-level functions may be named."""
        if not _trust.is_library_module(cls.__module__):
            self.user_modules.add(cls.__module__)

    def check_fields(self, cls: type, fields: dict, path: tuple, depth: int) -> None:
        """A dataclass's fields: known names, required ones present, values as declared."""
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
            self.check_declared(value, (*path, name), depth + 1, declared.get(name))

    def check_declared(self, value: Any, path: tuple, depth: int, declared: Any) -> None:
        """A field's value, with what the field's declared type demands of it."""
        bound = module_factory_bound(declared, self.module_bases)
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

    def _check_config(self, data, path, depth, declared) -> None:
        expected = config_type(declared)
        if expected is None:
            raise self.fail(
                path,
                "a config object may only be the value of a field whose class declares its "
                "type, and this one declares none (the file may have been tampered with).",
            )
        cls = self.check_class(data, path, (expected,), f"a {expected.__qualname__} config")
        self.instantiated(cls)
        if ("fields" in data) == ("dict" in data):
            raise self.fail(path, "a config entry needs exactly one of fields and dict.")
        if "fields" in data:
            if not dataclasses.is_dataclass(cls) or not isinstance(data["fields"], dict):
                raise self.fail(path, f"{cls.__qualname__} is not a dataclass with fields.")
            self.check_fields(cls, data["fields"], (*path, "fields"), depth)
        else:
            if not callable(getattr(cls, "from_dict", None)):
                raise self.fail(path, f"{cls.__qualname__} has no from_dict.")
            self.check(data["dict"], (*path, "dict"), depth + 1, None)

    def _check_class(self, data, path, depth, declared) -> None:
        self.check_class(data, path, self._class_bases, "a Flax module or Variable class")

    def dtype(self, name: Any, path: tuple) -> Any:
        try:
            return _trust.dtype_from_name(name)
        except Refused as e:
            raise self.fail(path, str(e)) from None

    def _check_dtype(self, data, path, depth, declared) -> None:
        self.dtype(data["name"], (*path, "name"))

    def _check_scalar(self, data, path, depth, declared) -> None:
        dtype = self.dtype(data["dtype"], (*path, "dtype"))
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
        if kind in self._owners:
            return self._owners[kind].decode(data, path)
        return getattr(self, f"_decode_{kind}")(data, path)

    def construct(self, path: tuple, build: Callable[[], Any], what: str) -> Any:
        """`build()`, with what the class's own code raises reported at `path`."""
        try:
            return build()
        except SerializationError:
            raise
        except Exception as e:  # the class's own code refused the file's values
            raise self.fail(path, f"{what} failed: {type(e).__name__}: {e}") from e

    def _decode_float(self, data, path):
        return float(data["value"])

    def _decode_scalar(self, data, path):
        dtype = self.dtype(data["dtype"], path)
        value = complex(*data["value"]) if dtype.kind == "c" else data["value"]
        return self.construct(path, lambda: dtype.type(value), f"a {dtype} scalar")

    def _decode_dtype(self, data, path):
        return self.dtype(data["name"], path)

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

    def fields_of(self, data: dict, path: tuple) -> dict:
        return {k: self.value(v, (*path, "fields", k)) for k, v in data.get("fields", {}).items()}

    def _decode_config(self, data, path):
        cls = self._classes[id(data)]
        if "fields" in data:
            fields = self.fields_of(data, path)
            return self.construct(path, lambda: cls(**fields), f"constructing {cls.__name__}")
        values = self.value(data["dict"], (*path, "dict"))
        if not isinstance(values, dict):
            raise self.fail((*path, "dict"), "a config's dict must be a mapping.")
        return self.construct(path, lambda: cls.from_dict(values), f"{cls.__name__}.from_dict")

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
        made = self.construct(path, lambda: factory(**kwargs), f"{ref['qualname']}(...)")
        if not callable(made):
            raise self.fail(path, f"{ref['qualname']}(...) did not make an initializer.")
        return made
