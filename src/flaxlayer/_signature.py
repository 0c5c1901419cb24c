"""How a layer calls a user function: which parameter gets the inputs, the training flag, ...

The rule, the same for Linen and NNX methods, `nnx.bridge` wrappers and `JaxLayer` functions:
parameters named after a role (`params`, `state`, `rng`, `inputs` for JaxLayer functions) get
that role's value; the training flag goes to every parameter named `training`, `train` or
`is_training` (True in `fit`) and its negation to `deterministic`; otherwise the first positional
parameter gets the inputs, whatever its name (`x`, `input_ids`, or `*args`). Parameters with
defaults keep them. A further required parameter cannot be filled and is an error.
"""

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any

#: Parameter names that receive the training flag, and whether they receive its negation.
TRAINING_FLAGS = {"training": False, "train": False, "is_training": False, "deterministic": True}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def describe(fn: Callable) -> str:
    """A short human name for a function, for error messages."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


@dataclasses.dataclass(frozen=True)
class Binding:
    """Which value each filled parameter of a function gets.

    `positional` and `keyword` hold roles: a name from `roles`, "inputs", "training" or
    "deterministic" (the negated flag). `names` maps each role to the parameter that takes it.
    """

    positional: tuple[str, ...]
    keyword: tuple[tuple[str, str], ...]
    names: dict[str, str]

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self.positional) | {role for _, role in self.keyword}

    @property
    def takes_training(self) -> bool:
        return bool(self.roles & {"training", "deterministic"})

    def arguments(self, values: dict[str, Any]) -> tuple[tuple, dict]:
        """The (args, kwargs) for the function; `values` maps roles to values ("training")."""
        if "deterministic" in self.roles:
            values = {**values, "deterministic": not values["training"]}
        return (
            tuple(values[role] for role in self.positional),
            {name: values[role] for name, role in self.keyword},
        )


def parameters_of(fn: Callable, *, owner: str, role: str) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{owner}: cannot read the signature of `{role}` {describe(fn)!r} ({e}). Pass a "
            "plain Python function or method."
        ) from e


def bind(
    fn: Callable,
    *,
    owner: str,
    role: str,
    roles: Iterable[str] = (),
    skip_first: bool = False,
    wrapper_hint: Callable[[list[str], "Binding | None"], str] | None = None,
) -> Binding:
    """Reads `fn`'s parameters under the rule above; raises ValueError naming what is wrong.

    `owner` names the layer and `role` the layer argument the function came from ("method",
    "call_fn"); both appear in every error. `roles` are the names bound by name (JaxLayer's
    `params`, `state`, `rng`); "inputs" is always one. With `skip_first`, the first parameter
    (the module) is not considered. `wrapper_hint(required, binding)` writes the fix shown when
    a required parameter cannot be filled.
    """
    roles = (*roles, "inputs")
    parameters = parameters_of(fn, owner=owner, role=role)[1 if skip_first else 0 :]
    named_inputs = any(p.name == "inputs" for p in parameters)
    positional: list[str] = []
    keyword: list[tuple[str, str]] = []
    names: dict[str, str] = {}
    contiguous = True  # positional arguments can still be appended
    unfilled: list[str] = []
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if "inputs" not in names and contiguous:
                positional.append("inputs")
                names["inputs"] = "*" + p.name
            contiguous = False
            continue
        if p.name in roles:
            given = p.name
        elif p.name in TRAINING_FLAGS:
            given = "deterministic" if TRAINING_FLAGS[p.name] else "training"
        elif "inputs" not in names and not named_inputs and p.kind in _POSITIONAL:
            given = "inputs"
        else:
            given = None
        if given is None or (given in names and given not in ("training", "deterministic")):
            if p.default is inspect.Parameter.empty:
                unfilled.append(p.name)
            contiguous = False
            continue
        names.setdefault(given, p.name)
        if contiguous and p.kind in _POSITIONAL:
            positional.append(given)
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            unfilled.append(p.name)
        else:
            keyword.append((p.name, given))
    binding = Binding(tuple(positional), tuple(keyword), names)
    if "inputs" not in names:
        taken = ", ".join(f"`{p.name}`" for p in parameters) or "no arguments"
        raise ValueError(
            f"{owner}: `{role}` {describe(fn)!r} takes no argument for the inputs (it takes "
            f"{taken}). It must take `inputs`, or a first positional argument (any name"
            + (", after the one that receives the module" if skip_first else "")
            + f") that receives them: def {getattr(fn, '__name__', 'fn')}("
            + ("module, " if skip_first else "")
            + "inputs, training=False)."
        )
    if unfilled:
        shown = ", ".join(f"`{n}`" for n in unfilled)
        by_name = ", ".join(f"`{r}`" for r in roles[:-1])
        hint = (
            wrapper_hint(unfilled, binding)
            if wrapper_hint
            else f", or rename it to the value it should receive ({by_name})."
        )
        raise ValueError(
            f"{owner}: `{role}` {describe(fn)!r} takes the required argument(s) {shown}, "
            f"which the layer cannot fill. It passes the inputs to `{names['inputs']}`"
            + (f", {by_name} by name" if by_name else "")
            + ", the training flag to `training`, `train` or `is_training` and its negation to "
            f"`deterministic`; any other argument needs a default. Give {shown} a default" + hint
        )
    return binding
