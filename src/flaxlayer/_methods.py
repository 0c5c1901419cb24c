"""Resolving a module's `method` argument (None, a name, a bound method, or a function)."""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from flaxlayer._signature import Binding, bind, describe


@dataclasses.dataclass(frozen=True)
class Method:
    """A module method as a function whose first argument is the module.

    `kind` is how the user gave it: "call" (None), "name" (a string), "bound" (a bound method of
    the module) or "function" (a function taking the module first); `name` is the method name
    for the first three. `binding` says which argument gets the inputs and the training flag.
    """

    fn: Callable
    kind: str
    name: str | None
    binding: Binding

    @property
    def takes_training(self) -> bool:
        return self.binding.takes_training

    def arguments(self, inputs: Any, training: bool) -> tuple[tuple, dict]:
        """The (args, kwargs) to call `fn(module, *args, **kwargs)` with."""
        return self.binding.arguments({"inputs": inputs, "training": training})


def method_by_name(cls: type, name: str, framework: tuple[type, ...]) -> Callable | None:
    """The function `name` of `cls`, if the class or a base below `framework` defines it.

    `framework` are the Flax base classes (nn.Module and its bases, or nnx.Module's): their API
    (`init`, `apply`, `bind`, `tabulate`, `sow`, ...) is never a method a layer calls, and
    neither is a dunder other than `__call__`, nor a dataclass field holding a function
    (`kernel_init`).
    """
    if name.startswith("__") and name.endswith("__") and name != "__call__":
        return None
    if name in getattr(cls, "__dataclass_fields__", {}):
        return None
    for klass in cls.__mro__:
        if name in vars(klass):
            fn = vars(klass)[name]
            if klass in framework or not inspect.isfunction(fn):
                return None
            return fn
    return None


def callable_methods(cls: type, framework: tuple[type, ...]) -> list[str]:
    """The names `method_by_name` accepts for `cls`, for error messages."""
    names = {n for klass in cls.__mro__ if klass not in framework for n in vars(klass)}
    return sorted(
        n
        for n in names
        if method_by_name(cls, n, framework) is not None and (n == "__call__" or n[0] != "_")
    )


def resolve_method(module: Any, method: Any, *, owner: str, framework: tuple[type, ...]) -> Method:
    cls = type(module)
    if method is None:
        fn, kind, name = method_by_name(cls, "__call__", framework), "call", "__call__"
        if fn is None:
            raise TypeError(f"{owner}: {cls.__name__} defines no `__call__`; pass `method=`.")
    elif isinstance(method, str):
        fn, kind, name = method_by_name(cls, method, framework), "name", method
        if fn is None:
            raise ValueError(
                f"{owner}: method={method!r}, but {cls.__name__} defines no method of that name "
                "(Flax's own Module API such as `init`, `apply` or `tabulate` is not a method "
                f"to call). Its methods: {', '.join(callable_methods(cls, framework)) or 'none'}."
                " Pass one of them, a bound method, or a function taking the module first."
            )
    elif inspect.ismethod(method) and isinstance(method.__self__, cls):
        name = method.__func__.__name__
        fn, kind = method_by_name(cls, name, framework), "bound"
        if fn is not method.__func__:
            raise ValueError(
                f"{owner}: method {describe(method)!r} is Flax's Module API or not defined by "
                f"{cls.__name__}; pass a method that {cls.__name__} defines."
            )
    elif callable(method) and not isinstance(method, type):
        fn, kind, name = method, "function", None
    else:
        raise TypeError(
            f"{owner}: method must be None, a method name, a bound method of the module, or a "
            f"function taking the module first; got {type(method).__name__}: {method!r}."
        )

    def hint(required: list[str], binding: Binding | None) -> str:
        return _wrapper_hint(cls, kind, name, fn, required, binding)

    binding = bind(fn, owner=owner, role="method", skip_first=True, wrapper_hint=hint)
    return Method(fn=fn, kind=kind, name=name, binding=binding)


def _wrapper_hint(cls, kind, name, fn, required, binding) -> str:
    if kind == "function":
        return (
            f", or change {describe(fn)} so that it takes (module, inputs, training) and "
            "supplies the rest itself."
        )
    values = [binding.names["inputs"].lstrip("*"), *required]
    target = "module" if name == "__call__" else f"module.{name}"
    flags = [
        f"{param}={'not training' if role == 'deterministic' else 'training'}"
        for param, role in ((binding.names.get(r), r) for r in ("training", "deterministic"))
        if param
    ]
    unpack = f"        {', '.join(values)} = inputs  # supply {', '.join(required)} here\n"
    call = ", ".join([*values, *flags])
    return (
        ", or pass a function that supplies them (define it next to "
        f"{cls.__name__}, or register it, so that the model can be saved):\n\n"
        "    @keras.saving.register_keras_serializable()\n"
        f"    def call_{cls.__name__.lower()}(module, inputs, training=False):\n"
        f"{unpack}"
        f"        return {target}({call})\n\n"
        f"    FlaxLayer({cls.__name__}(...), method=call_{cls.__name__.lower()})\n"
    )
