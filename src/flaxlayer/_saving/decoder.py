"""Checks a `.keras` config whole, then rebuilds the module it describes, under `_trust`.

Loading checks the whole entry tree first (its shape, every class it names, every config's
and enum member's class against its field's declared type) before anything is constructed,
never imports in safe mode (nor, in any mode, for a config or enum class), allocates nothing
sized by the file (NNX variables come back abstract; values travel in the weights file), and
reports every problem as `SerializationError` with the config path of the entry.
"""

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

from flaxlayer import _trust
from flaxlayer._saving.builds import BUILDERS, build_function
from flaxlayer._saving.checks import CHECKS
from flaxlayer._saving.codec import KindCodec
from flaxlayer._saving.errors import SerializationError, in_safe_mode
from flaxlayer._saving.schema import (
    MAX_DEPTH,
    SCHEMA,
    SKIPPED_FIELDS,
    TAG,
    config_type,
    declared_types,
    enum_types,
    is_loose,
    item_type,
    module_factory_bound,
)
from flaxlayer._trust import Refused


def _show(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top)"


class Decoder:
    """Rebuilds what `Encoder` captured, under the rules of `_trust`.

    `decode_module` first walks the whole entry tree without constructing anything: it checks
    every entry's keys against `SCHEMA` and its nesting depth, resolves every class it names
    (and checks what its position needs), and records the Python modules of the user classes
    the file instantiates: only their top-level functions may be resolved by name. Each entry
    kind is checked and built by the handler its table names: `CHECKS` and `BUILDERS` for the
    kinds every module kind shares, the codec's `check` and `decode` for the codec's own.
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
        self.module_modules: set[str] = set()  # of the user module classes the file builds
        self._beside: list[tuple[tuple, type]] = []
        self.codecs = [kind(self) for kind in kinds]
        self.class_bases = tuple(b for kind in kinds for b in kind.class_bases)
        self.module_bases = tuple(kind.module_base for kind in kinds)
        self._schema = dict(SCHEMA)
        self._checks: dict[str, Callable[[dict, tuple, int, Any], None]] = {
            kind: functools.partial(check, self) for kind, check in CHECKS.items()
        }
        self._builders: dict[str, Callable[[dict, tuple], Any]] = {
            kind: functools.partial(build, self) for kind, build in BUILDERS.items()
        }
        for codec in self.codecs:
            self._schema.update(codec.entries)
            self._checks.update(dict.fromkeys(codec.entries, codec.check))
            self._builders.update(dict.fromkeys(codec.entries, codec.decode))
        self._classes: dict[int, type] = {}

    def fail(self, path: tuple, what: str) -> SerializationError:
        """The error for the entry at `path` (the config path is part of the message)."""
        return SerializationError(f"{self.owner}: cannot load config entry {_show(path)}: {what}")

    def decode_module(self, data: Any) -> Any:
        """The module a config entry describes, once the whole tree is checked."""
        self.check(data, self.root, 0, None)
        for codec in self.codecs:
            codec.finish_check()
        self._check_beside()
        return self.value(data, self.root)

    # ----------------------------------------------------------------------------- checking

    def check(self, data: Any, path: tuple, depth: int, declared: Any) -> None:
        """Checks `data` and everything in it without building anything."""
        if depth > MAX_DEPTH:
            raise self.fail(path, f"it is nested deeper than {MAX_DEPTH} levels.")
        if not (isinstance(data, dict) and TAG in data):
            self._check_json(data, path, depth, declared)
            return
        kind = data[TAG]
        self._check_keys(kind, data, path)
        self._checks[kind](data, path, depth, declared)

    def _check_json(self, data: Any, path: tuple, depth: int, declared: Any) -> None:
        """JSON that is no entry: a list or mapping (each item checked) or a plain value."""
        if isinstance(data, list):
            for i, v in enumerate(data):
                self.check(v, (*path, i), depth + 1, item_type(declared, i))
        elif isinstance(data, dict):
            for k, v in data.items():
                self.check(v, (*path, k), depth + 1, None)
        elif not (data is None or isinstance(data, (bool, int, float, str))):
            raise self.fail(path, f"{type(data).__name__} is not a JSON value.")

    def _check_keys(self, kind: Any, data: dict, path: tuple) -> None:
        """The entry's kind is one flaxlayer writes, and its keys are that kind's."""
        if not isinstance(kind, str) or kind not in self._schema:
            raise self.fail(
                path,
                f"{str(kind)[:100]!r} is not a kind of entry flaxlayer writes (a damaged file).",
            )
        required, optional = self._schema[kind]
        keys = set(data) - {TAG}
        if not required <= keys or not keys <= required | optional:
            raise self.fail(
                path,
                f"a {kind!r} entry has the keys {sorted(keys)}; it needs {sorted(required)} and "
                f"may have {sorted(optional)}.",
            )

    def _resolve(self, data: dict, path: tuple, safe: bool, what: str = "") -> type:
        """The class an entry names, under `_trust.resolve_class` (a config or enum class,
        `what`, under `_trust.resolve_loaded_class`)."""
        ref = data["class"]
        if not (
            isinstance(ref, dict)
            and set(ref) == {"module", "qualname"}
            and all(isinstance(ref[k], str) for k in ref)
        ):
            raise self.fail((*path, "class"), f"the class reference {ref!r} is malformed.")
        try:
            if what:
                return _trust.resolve_loaded_class(ref["module"], ref["qualname"], what)
            return _trust.resolve_class(ref["module"], ref["qualname"], safe=safe)
        except Refused as e:
            raise self.fail((*path, "class"), str(e)) from None

    def check_class(self, data: dict, path: tuple, bases: tuple[type, ...], what: str) -> type:
        """Resolves the class an entry names (under `_trust`); it must subclass `bases`."""
        cls = self._resolve(data, path, self.safe)
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

    def config_class(self, data: dict, path: tuple, declared: Any) -> type:
        """The class of a config entry, read only from an imported module: the declared class,
        a subclass or a sibling of it (`_trust.are_siblings`), or, in a field declared loosely,
        a class beside a module class of yours the file builds (checked by `_check_beside`)."""
        cls = self._resolve(data, path, True, "a config class")
        expected = config_type(declared)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if issubclass(cls, (*self.class_bases, *self.module_bases)):
            raise self.fail((*path, "class"), f"{name} is a Flax class, not a config class.")
        if expected is not None and (
            issubclass(cls, expected) or _trust.are_siblings(cls, expected)
        ):
            pass
        elif expected is None and is_loose(declared):
            self._beside.append((path, cls))
        else:
            raise self.fail(
                (*path, "class"),
                f"{name} is not the config class the field declares ({declared!r}), a subclass "
                "of it, or a sibling of it (a class of the same package under the same parent "
                "classes); the file may have been tampered with.",
            )
        self._classes[id(data)] = cls
        return cls

    def enum_class(self, data: dict, path: tuple, declared: Any) -> type:
        """The class of an enum entry, read only from an imported module: an Enum class the
        field's annotation names, or one beside a module class of yours the file builds."""
        cls = self._resolve(data, path, True, "an enum class")
        if not issubclass(cls, enum.Enum):
            raise self.fail(
                (*path, "class"),
                f"{cls.__module__}.{cls.__qualname__} is not an Enum class; the file may have "
                "been tampered with.",
            )
        if not any(issubclass(cls, e) for e in enum_types(declared)):
            self._beside.append((path, cls))
        self._classes[id(data)] = cls
        return cls

    def _check_beside(self) -> None:
        """Each config or enum class no annotation named is defined beside a module class of
        yours that the file builds (known only once the whole file is checked)."""
        for path, cls in self._beside:
            if cls.__module__ not in self.module_modules:
                built = ", ".join(repr(m) for m in sorted(self.module_modules)) or "none"
                raise self.fail(
                    (*path, "class"),
                    f"{cls.__module__}.{cls.__qualname__} is not the class the field declares, "
                    "and a class the field does not declare is accepted only if it is defined "
                    "in the module of a Flax module class of yours the file builds (here: "
                    f"{built}); the file may have been tampered with.",
                )

    def class_of(self, data: dict) -> type:
        """The class `check_class` resolved for `data`."""
        return self._classes[id(data)]

    def instantiated(self, cls: type) -> None:
        """Records that the file builds `cls`: its module's top-level functions may be named."""
        if not _trust.is_library_module(cls.__module__):
            self.user_modules.add(cls.__module__)
            if issubclass(cls, self.module_bases):
                self.module_modules.add(cls.__module__)

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
        if bound is not None and not issubclass(self.class_of(value), bound):
            raise self.fail(
                path,
                f"the class must be a subclass of {bound.__qualname__} (declared {declared!r}).",
            )

    def dtype(self, name: Any, path: tuple) -> Any:
        """The dtype a file names (numeric or bool only)."""
        try:
            return _trust.dtype_from_name(name)
        except Refused as e:
            raise self.fail(path, str(e)) from None

    # ---------------------------------------------------------------------------- building

    def value(self, data: Any, path: tuple) -> Any:
        """What a checked `data` describes, built."""
        if isinstance(data, list):
            return [self.value(v, (*path, i)) for i, v in enumerate(data)]
        if not isinstance(data, dict):
            return data
        kind = data.get(TAG)
        if kind is None:
            return {k: self.value(v, (*path, k)) for k, v in data.items()}
        return self._builders[kind](data, path)

    def construct(self, path: tuple, build: Callable[[], Any], what: str) -> Any:
        """`build()`, with what the class's own code raises reported at `path`."""
        try:
            return build()
        except SerializationError:
            raise
        except Exception as e:  # the class's own code refused the file's values
            raise self.fail(path, f"{what} failed: {type(e).__name__}: {e}") from e

    def fields_of(self, data: dict, path: tuple) -> dict:
        """A checked entry's fields, built."""
        return {k: self.value(v, (*path, "fields", k)) for k, v in data.get("fields", {}).items()}

    def decode_method_function(self, data: Any, path: tuple) -> Callable:
        """A `method=` function: registered, or defined next to a class the file builds."""
        self.check(data, path, 0, None)
        if not (isinstance(data, dict) and data.get(TAG) == "function"):
            raise self.fail(path, "a method function must be a function entry.")
        return build_function(self, data, path, numerical=False)
