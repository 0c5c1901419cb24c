"""The entries a `.keras` config holds: their kinds and keys, and the types fields declare."""

import collections.abc
import enum
import functools
import inspect
import types
import typing
from typing import Any

from flaxlayer import _trust

#: The key that marks a dict as an entry, naming its kind.
TAG = "__flaxlayer__"
#: Dataclass fields never written (Flax sets a module's parent itself).
SKIPPED_FIELDS = ("parent",)
#: How deep entries may nest in a file.
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
    ("enum", {"class", "name"}, ()),
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


def _annotations(source: Any) -> dict[str, Any]:
    """The annotations of `source` and its bases that resolve, read one by one."""
    hints = {}
    for klass in reversed(getattr(source, "__mro__", (source,))):
        for name, annotation in getattr(klass, "__annotations__", {}).items():
            if isinstance(annotation, str):
                annotation = _trust.lookup(klass.__module__, annotation)
            if annotation is not None:
                hints[name] = annotation
    return hints


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
            hints = _annotations(source)
        declared.update(hints)
    return declared


def _unwrap_optional(annotation: Any) -> Any:
    """T of `T | None` or `Optional[T]`; None for a union of several types; else `annotation`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        return arms[0] if len(arms) == 1 else None
    return annotation


def config_type(annotation: Any) -> type | None:
    """The class a field declared `T`, `T | None` or `Optional[T]` holds, else None."""
    annotation = _unwrap_optional(annotation)
    if not isinstance(annotation, type) or annotation in (object, typing.Any):
        return None
    return annotation


def is_loose(annotation: Any) -> bool:
    """Whether a field is declared loosely: `object`, `Any` (or Optional of them), or not at all."""
    if annotation is None:
        return True
    annotation = _unwrap_optional(annotation)
    return annotation is object or annotation is typing.Any


#: Containers whose one type argument is the type of every item (`Sequence[X]`, `list[X]`).
_HOMOGENEOUS = (
    list,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Iterable,
    collections.abc.Collection,
)


def item_type(annotation: Any, index: int) -> Any:
    """The type a tuple or list field declares for its item `index` (X of `tuple[X, ...]`,
    `Sequence[X]`, `list[X]`, also under Optional; the index-th type of `tuple[X, Y]`), else
    None."""
    annotation = _unwrap_optional(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is tuple:
        return args[index] if index < len(args) else None
    if origin in _HOMOGENEOUS and len(args) == 1:
        return args[0]
    return None


def enum_types(annotation: Any) -> tuple[type, ...]:
    """The Enum classes an annotation names anywhere in it (`E`, `E | None`, `tuple[E, E]`)."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return (annotation,)
    return tuple(e for arg in typing.get_args(annotation) for e in enum_types(arg))


def module_factory_bound(annotation: Any, bases: tuple[type, ...]) -> type | None:
    """M for a field declared `type[M]` or `Callable[..., M]` with M a subclass of `bases`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is type and args:
        bound = args[0]
    elif origin is collections.abc.Callable and len(args) == 2:
        bound = args[1]
    else:
        return None
    return bound if isinstance(bound, type) and issubclass(bound, bases) else None
