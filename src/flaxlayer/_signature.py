"""Argument-name contracts for the functions a layer calls."""

import inspect
from collections.abc import Callable, Iterable

_NAMED_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def describe(fn: Callable) -> str:
    """A short human name for a function, for error messages."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def check_arguments(
    fn: Callable,
    *,
    owner: str,
    role: str,
    allowed: Iterable[str],
    required: Iterable[str] = ("inputs",),
    skip_first: bool = False,
) -> tuple[str, ...]:
    """Returns the argument names of `fn`, in order, after checking them.

    `owner` names the layer (e.g. "FlaxLayer 'flax_layer'") and `role` the argument of the layer
    the function came from (e.g. "call_fn"); both appear in every error. With `skip_first`, the
    first parameter (the module) is not checked.
    """
    allowed = tuple(allowed)
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{owner}: cannot read the signature of {role} {describe(fn)!r} ({e}). "
            "Pass a plain Python function or method."
        ) from e
    if skip_first:
        parameters = parameters[1:]
    expected = ", ".join(f"`{name}`" for name in allowed)
    names = []
    for p in parameters:
        if p.kind not in _NAMED_KINDS:
            star = "*" if p.kind is inspect.Parameter.VAR_POSITIONAL else "**"
            raise ValueError(
                f"{owner}: {role} {describe(fn)!r} takes `{star}{p.name}`; it may only take "
                f"named arguments among {expected}. Wrap it in a function with those argument "
                "names."
            )
        if p.name not in allowed:
            raise ValueError(
                f"{owner}: {role} {describe(fn)!r} takes an argument `{p.name}`, but the only "
                f"arguments it may take are {expected}. Rename the argument, or wrap the "
                f"function: def wrapper({', '.join(required) or 'inputs'}): ..."
            )
        names.append(p.name)
    for name in required:
        if name not in names:
            raise ValueError(
                f"{owner}: {role} {describe(fn)!r} must take an argument named `{name}`; it "
                f"takes ({', '.join(names) or 'nothing'}). Rename its argument to `{name}`."
            )
    return tuple(names)
