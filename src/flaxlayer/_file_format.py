"""The top level of a flaxlayer layer's config in a `.keras` file: its keys, their types, and the
file format's version, checked before any value is used.

Rule: a layer config is a dict whose every key is one this flaxlayer writes for the layer's
class, each holding a value of that key's JSON type, with the keys the class needs present and
a format version this flaxlayer reads. Everything below the top level is checked by the reader
of its entry (the decoder, the spec reader, the fine-tuning reader).
"""

import importlib.metadata
import inspect
import re
from typing import Any

from flaxlayer._saving import SerializationError

#: The format this flaxlayer writes. 1: files without a `format` entry (flaxlayer 0.1 before
#: the entry); 2: the `format` entry, enum and sibling-config entries, given variable shapes.
FORMAT_VERSION = 2
#: The formats this flaxlayer reads.
READS = (1, 2)

_NONE = type(None)
#: A layer name every backend can scope its variables by (TensorFlow's name-scope characters).
LAYER_NAME = re.compile(r"[A-Za-z0-9_.>-]{1,255}")
#: Any JSON value: a subclass's own arguments.
_ANY = (_NONE, bool, int, float, str, list, dict)
#: key -> the JSON types it may hold: what every flaxlayer layer writes (Keras's base keys
#: included: `activity_regularizer` is Keras's entry, deserialized by Keras).
COMMON: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "trainable": (bool,),
    "dtype": (_NONE, str, dict),
    "activity_regularizer": (_NONE, str, dict),
    "seed": (_NONE, int),
    "native_serialization_platforms": (_NONE, list),
    "finetune": (_NONE, dict),
    "format": (dict,),
}
#: The keys of each class's own entries, and those it cannot do without.
JAX_LAYER = {"call_fn": (dict,), "init_fn": (_NONE, dict), "params": (dict,), "state": (dict,)}
FLAX_LAYER = {"module": (dict,), "method": (_NONE, dict), "variables": (dict,)}
REQUIRED = {"JaxLayer": ("name", "call_fn"), "FlaxLayer": ("name", "module")}
_TYPE_NAMES: dict[type, str] = {
    _NONE: "null",
    str: "a string",
    bool: "true or false",
    int: "an integer",
}
_TYPE_NAMES |= {float: "a number", dict: "an object", list: "a list"}


def format_entry() -> dict:
    """The `format` entry every config gets: the format's version and the writer's version."""
    return {"version": FORMAT_VERSION, "flaxlayer": _installed()}


def checked(config: Any, cls: type, kind: str, own: dict[str, tuple[type, ...]]) -> dict:
    """`config` (a copy) once its top level follows the rule above, the `format` entry
    removed. `kind` is JaxLayer or FlaxLayer; a subclass `cls` may add the arguments its own
    `__init__` names (their values are its own to check)."""
    shown = f"{cls.__name__} {config.get('name')!r}" if isinstance(config, dict) else cls.__name__
    if not isinstance(config, dict):
        raise _fail(shown, (), f"the layer config is {type(config).__name__}, not an object.")
    allowed = COMMON | _subclass_arguments(cls, kind) | own
    unknown = sorted(str(k) for k in config if k not in allowed)
    if unknown:
        raise _fail(
            shown,
            (),
            f"{', '.join(map(repr, unknown))} is not a key flaxlayer writes for a {kind} "
            f"(it writes {', '.join(sorted(allowed))}).",
        )
    missing = [k for k in REQUIRED[kind] if k not in config]
    if missing:
        raise _fail(shown, (), f"the config has no {', '.join(map(repr, missing))}.")
    for key, value in config.items():
        if not _is_one_of(value, allowed[key]):
            wanted = " or ".join(_TYPE_NAMES[t] for t in allowed[key])
            raise _fail(shown, (key,), f"expected {wanted}, got {_kind(value)}.")
    if not LAYER_NAME.fullmatch(config["name"]):
        raise _fail(
            shown,
            ("name",),
            "a layer name is 1 to 255 letters, digits and the characters _ . > - (names "
            "every backend can scope variables by).",
        )
    config = dict(config)
    check_version(config.pop("format", None), shown)
    return config


def check_version(entry: dict | None, owner: str) -> None:
    """A format this flaxlayer reads; a newer one names the flaxlayer to install."""
    if entry is None:
        return  # written before the entry: format 1
    if set(entry) != {"version", "flaxlayer"}:
        raise _fail(owner, ("format",), "a format entry has the keys version and flaxlayer.")
    version, writer = entry["version"], entry["flaxlayer"]
    if not (_is_one_of(version, (int,)) and isinstance(writer, str) and len(writer) <= 64):
        raise _fail(owner, ("format",), f"{entry!r} is not a format entry.")
    if version > max(READS):
        raise SerializationError(
            f"{owner}: the file was written by flaxlayer {writer} in file format {version}; "
            f"this flaxlayer ({_installed()}) reads formats {READS[0]} to {READS[-1]}. "
            f"Install a flaxlayer that reads it: pip install -U 'flaxlayer>={writer}'."
        )
    if version not in READS:
        raise _fail(owner, ("format", "version"), f"{version!r} is not a file format version.")


def _is_one_of(value: Any, types: tuple[type, ...]) -> bool:
    """JSON's types: true and false are not integers here."""
    if isinstance(value, bool):
        return bool in types
    return any(value is None if t is _NONE else isinstance(value, t) for t in types)


def _subclass_arguments(cls: type, kind: str) -> dict[str, tuple[type, ...]]:
    """The named `__init__` arguments a user's subclass adds (none for the classes themselves)."""
    if cls.__name__ == kind and cls.__module__.startswith("flaxlayer."):
        return {}
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin __init__
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: _ANY for n, p in parameters.items() if p.kind in named}


def _kind(value: Any) -> str:
    for t, name in _TYPE_NAMES.items():
        if _is_one_of(value, (t,)):
            return f"{name} ({str(value)[:60]!r})" if t is str else name
    return type(value).__name__


def _fail(owner: str, path: tuple, what: str) -> SerializationError:
    where = "config" + "".join(f".{p}" for p in path)
    return SerializationError(f"{owner}: cannot load {where}: {what}")


def _installed() -> str:
    try:
        return importlib.metadata.version("flaxlayer")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return "0+unknown"
