"""How each entry kind every module kind shares is built, once the whole file is checked.

Each takes the `Decoder` and a checked entry; `BUILDERS` maps each kind to its builder.
"""

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flax.core import FrozenDict

from flaxlayer import _trust
from flaxlayer._trust import Refused

if TYPE_CHECKING:
    from flaxlayer._saving.decoder import Decoder


def build_float(decoder: "Decoder", data: dict, path: tuple) -> float:
    return float(data["value"])


def build_scalar(decoder: "Decoder", data: dict, path: tuple) -> Any:
    dtype = decoder.dtype(data["dtype"], path)
    value = complex(*data["value"]) if dtype.kind == "c" else data["value"]
    return decoder.construct(path, lambda: dtype.type(value), f"a {dtype} scalar")


def build_dtype(decoder: "Decoder", data: dict, path: tuple) -> Any:
    return decoder.dtype(data["name"], path)


def build_class(decoder: "Decoder", data: dict, path: tuple) -> type:
    return decoder.class_of(data)


def build_tuple(decoder: "Decoder", data: dict, path: tuple) -> tuple:
    return tuple(decoder.value(v, (*path, "items", i)) for i, v in enumerate(data["items"]))


def build_dict(decoder: "Decoder", data: dict, path: tuple) -> dict:
    """A dict from [key, value] pairs; a list key becomes a tuple."""
    items = {}
    for i, (k, v) in enumerate(data["items"]):
        key = decoder.value(k, (*path, "items", i, 0))
        key = tuple(key) if isinstance(key, list) else key
        try:
            items[key] = decoder.value(v, (*path, "items", i, 1))
        except TypeError:
            raise decoder.fail((*path, "items", i), f"{key!r} cannot be a dict key.") from None
    return items


def build_frozendict(decoder: "Decoder", data: dict, path: tuple) -> FrozenDict:
    return FrozenDict(build_dict(decoder, data, path))


def build_partial(decoder: "Decoder", data: dict, path: tuple) -> functools.partial:
    """A `functools.partial` of a function that is no initializer."""
    func = decoder.value(data["func"], (*path, "func"))
    if _trust.is_initializer(func) or not callable(func):
        raise decoder.fail((*path, "func"), f"{func!r} cannot be wrapped in a partial.")
    args = [decoder.value(v, (*path, "args", i)) for i, v in enumerate(data.get("args", []))]
    keywords = {
        k: decoder.value(v, (*path, "keywords", k)) for k, v in data.get("keywords", {}).items()
    }
    return functools.partial(func, *args, **keywords)


def build_config(decoder: "Decoder", data: dict, path: tuple) -> Any:
    """A config object, from its fields or through its class's `from_dict`."""
    cls: Any = decoder.class_of(data)
    if "fields" in data:
        fields = decoder.fields_of(data, path)
        return decoder.construct(path, lambda: cls(**fields), f"constructing {cls.__name__}")
    values = decoder.value(data["dict"], (*path, "dict"))
    if not isinstance(values, dict):
        raise decoder.fail((*path, "dict"), "a config's dict must be a mapping.")
    return decoder.construct(path, lambda: cls.from_dict(values), f"{cls.__name__}.from_dict")


def build_enum(decoder: "Decoder", data: dict, path: tuple) -> Any:
    """An enum member, looked up by name among its (checked) class's members."""
    return _trust.enum_member(decoder.class_of(data), data["name"])


def build_function(
    decoder: "Decoder", data: dict, path: tuple, *, numerical: bool = True
) -> Callable:
    """The function an entry names, under `_trust.resolve_function`."""
    try:
        return _trust.resolve_function(
            data, safe=decoder.safe, user_modules=decoder.user_modules, numerical=numerical
        )
    except Refused as e:
        raise decoder.fail(path, str(e)) from e.__cause__


def build_factory(decoder: "Decoder", data: dict, path: tuple) -> Callable:
    """An initializer, made by calling an allow-listed factory with the file's arguments."""
    ref = data["factory"]
    factory = _trust.lookup(ref["module"], ref["qualname"])
    if _trust.factory_name(factory) is None:
        raise decoder.fail(
            (*path, "factory"),
            f"{ref['module']}.{ref['qualname']} is not an initializer factory: only the JAX "
            "and Flax initializer factories (variance_scaling, normal, constant, ...) may be "
            "called while loading; the file may have been tampered with.",
        )
    kwargs = {k: decoder.value(v, (*path, "kwargs", k)) for k, v in data.get("kwargs", {}).items()}
    made = decoder.construct(path, lambda: factory(**kwargs), f"{ref['qualname']}(...)")
    if not callable(made):
        raise decoder.fail(path, f"{ref['qualname']}(...) did not make an initializer.")
    return made


#: `build(decoder, data, path)` of a checked entry, by kind.
Build = Callable[["Decoder", dict, tuple], Any]

BUILDERS: dict[str, Build] = {
    "config": build_config,
    "enum": build_enum,
    "class": build_class,
    "function": build_function,
    "factory": build_factory,
    "partial": build_partial,
    "tuple": build_tuple,
    "dict": build_dict,
    "frozendict": build_frozendict,
    "dtype": build_dtype,
    "scalar": build_scalar,
    "float": build_float,
}
