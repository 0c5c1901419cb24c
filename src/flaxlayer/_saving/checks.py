"""The checks of each entry kind every module kind shares, run before anything is built.

Each takes the `Decoder` and an entry whose keys it already checked against the schema;
`CHECKS` maps each kind to its check.
"""

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flaxlayer import _trust
from flaxlayer._saving.schema import TAG
from flaxlayer._trust import Refused

if TYPE_CHECKING:
    from flaxlayer._saving.decoder import Decoder


def check_config(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """A config object: of a class its field allows (see `Decoder.config_class`), by fields or
    by `from_dict`."""
    cls = decoder.config_class(data, path, declared)
    decoder.instantiated(cls)
    if ("fields" in data) == ("dict" in data):
        raise decoder.fail(path, "a config entry needs exactly one of fields and dict.")
    if "fields" in data:
        if not dataclasses.is_dataclass(cls) or not isinstance(data["fields"], dict):
            raise decoder.fail(path, f"{cls.__qualname__} is not a dataclass with fields.")
        decoder.check_fields(cls, data["fields"], (*path, "fields"), depth)
    else:
        if not callable(getattr(cls, "from_dict", None)):
            raise decoder.fail(path, f"{cls.__qualname__} has no from_dict.")
        decoder.check(data["dict"], (*path, "dict"), depth + 1, None)


def check_enum(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """An enum member: a class its field allows (see `Decoder.enum_class`) and a member name."""
    cls = decoder.enum_class(data, path, declared)
    try:
        _trust.enum_member(cls, data["name"])
    except Refused as e:
        raise decoder.fail((*path, "name"), str(e)) from None


def check_class(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    decoder.check_class(data, path, decoder.class_bases, "a Flax module or Variable class")


def check_dtype(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    decoder.dtype(data["name"], (*path, "name"))


def check_scalar(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """A NumPy scalar: a number (a [real, imaginary] pair if complex) of a numeric dtype."""
    dtype = decoder.dtype(data["dtype"], (*path, "dtype"))
    value = data["value"]
    if dtype.kind == "c":
        ok = isinstance(value, list) and len(value) == 2
        ok = ok and all(isinstance(v, (int, float)) for v in value)
    else:
        ok = isinstance(value, (bool, int, float))
    if not ok:
        raise decoder.fail((*path, "value"), f"{value!r} is not a number of dtype {dtype}.")


def check_float(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    if data["value"] not in ("inf", "-inf", "nan"):
        raise decoder.fail((*path, "value"), f"{data['value']!r} is not inf, -inf or nan.")


def check_function(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    keys = set(data) - {TAG}
    if keys not in ({"registered"}, {"module", "qualname"}) or not all(
        isinstance(data[k], str) for k in keys
    ):
        raise decoder.fail(path, "a function is named by module and qualname, or registered.")


def check_factory(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """An initializer factory call: a reference to the factory and a mapping of arguments."""
    ref = data["factory"]
    if not (
        isinstance(ref, dict)
        and set(ref) == {"module", "qualname"}
        and all(isinstance(v, str) for v in ref.values())
    ):
        raise decoder.fail((*path, "factory"), f"{str(ref)[:200]} is not a factory reference.")
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise decoder.fail((*path, "kwargs"), "kwargs must be a mapping.")
    for k, v in kwargs.items():
        decoder.check(v, (*path, "kwargs", k), depth + 1, None)


def check_partial(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """A `functools.partial`: a function, a list of arguments and a mapping of keywords."""
    decoder.check(data["func"], (*path, "func"), depth + 1, None)
    args, keywords = data.get("args", []), data.get("keywords", {})
    if not isinstance(args, list) or not isinstance(keywords, dict):
        raise decoder.fail(path, "a partial's args must be a list and keywords a mapping.")
    decoder.check(args, (*path, "args"), depth + 1, None)
    for k, v in keywords.items():
        if not k.isidentifier():
            raise decoder.fail((*path, "keywords"), f"{k!r} is not a keyword name.")
        decoder.check(v, (*path, "keywords", k), depth + 1, None)


def check_tuple(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    if not isinstance(data["items"], list):
        raise decoder.fail((*path, "items"), "items must be a list.")
    decoder.check(data["items"], (*path, "items"), depth + 1, declared)


def check_dict(decoder: "Decoder", data: dict, path: tuple, depth: int, declared: Any) -> None:
    """A dict or FrozenDict: a list of [key, value] pairs (keys need not be strings)."""
    items = data["items"]
    if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
        raise decoder.fail((*path, "items"), "items must be a list of [key, value] pairs.")
    decoder.check(items, (*path, "items"), depth + 1, None)


#: `check(decoder, data, path, depth, declared)` of an entry, by kind.
Check = Callable[["Decoder", dict, tuple, int, Any], None]

CHECKS: dict[str, Check] = {
    "config": check_config,
    "enum": check_enum,
    "class": check_class,
    "function": check_function,
    "factory": check_factory,
    "partial": check_partial,
    "tuple": check_tuple,
    "dict": check_dict,
    "frozendict": check_dict,
    "dtype": check_dtype,
    "scalar": check_scalar,
    "float": check_float,
}
