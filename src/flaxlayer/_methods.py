"""Resolving a module's `method` argument (None, a name, a bound method, or a function)."""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from flaxlayer._signature import check_arguments, describe

METHOD_ARGUMENTS = ("inputs", "training")


@dataclasses.dataclass(frozen=True)
class Method:
    """A module method as a function whose first argument is the module.

    `kind` is how the user gave it: "call" (None), "name" (a string), "bound" (a bound method of
    the module) or "function" (a function taking `module` first); `name` is the method name for
    the first three.
    """

    fn: Callable
    kind: str
    name: str | None
    takes_training: bool
    #: A method with only `*args` (e.g. nnx.bridge wrappers): inputs are passed positionally.
    positional: bool = False


def resolve_method(module: Any, method: Any, *, owner: str) -> Method:
    cls = type(module)
    if method is None:
        fn, kind, name = cls.__call__, "call", "__call__"
    elif isinstance(method, str):
        fn = getattr(cls, method, None)
        if fn is None or not callable(fn):
            available = sorted(
                n
                for n, v in vars(cls).items()
                if callable(v) and not n.startswith("_") and inspect.isfunction(v)
            )
            raise ValueError(
                f"{owner}: method={method!r}, but {cls.__name__} has no method of that name. "
                f"Its methods: {', '.join(available) or 'none besides __call__'}. Pass one of "
                "them, a bound method, or a function whose first argument is `module`."
            )
        kind, name = "name", method
    elif inspect.ismethod(method) and isinstance(method.__self__, cls):
        fn, kind, name = method.__func__, "bound", method.__func__.__name__
    elif callable(method):
        params = _parameters(method, owner)
        if not params or params[0].name != "module":
            first = params[0].name if params else "nothing"
            raise ValueError(
                f"{owner}: method {describe(method)!r} is not a method of {cls.__name__}, so its "
                f"first argument must be named `module` (the module is passed there); it takes "
                f"{first!r} first. Define it as `def {getattr(method, '__name__', 'fn')}(module, "
                "inputs, training): ...`."
            )
        fn, kind, name = method, "function", None
    else:
        raise TypeError(
            f"{owner}: method must be None, a method name, a bound method of the module, or a "
            f"function taking `module` first; got {type(method).__name__}: {method!r}."
        )
    rest = _parameters(fn, owner)[1:]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in rest) and not any(
        p.name in METHOD_ARGUMENTS for p in rest
    ):
        return Method(fn=fn, kind=kind, name=name, takes_training=False, positional=True)
    names = check_arguments(
        fn, owner=owner, role="method", allowed=METHOD_ARGUMENTS, skip_first=True
    )
    return Method(fn=fn, kind=kind, name=name, takes_training="training" in names)


def method_arguments(method: Method, inputs, training) -> tuple[tuple, dict]:
    """The (args, kwargs) to call `method.fn(module, *args, **kwargs)` with."""
    if method.positional:
        return (inputs,), {}
    if method.takes_training:
        return (), {"inputs": inputs, "training": training}
    return (), {"inputs": inputs}


def _parameters(fn: Callable, owner: str) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{owner}: cannot read the signature of method {fn!r} ({e}).") from e
