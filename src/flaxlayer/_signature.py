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
from collections.abc import Callable, Iterable, Mapping
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
    `by_name` are the parameters a dict of inputs may fill (the inputs parameter among them);
    `unfilled` the required ones only such a dict can fill, and `unfilled_error` what a call
    that leaves them empty is told.
    """

    positional: tuple[str, ...]
    keyword: tuple[tuple[str, str], ...]
    names: dict[str, str]
    by_name: frozenset[str] = frozenset()
    unfilled: tuple[str, ...] = ()
    unfilled_error: str = ""

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self.positional) | {role for _, role in self.keyword}

    @property
    def takes_training(self) -> bool:
        return bool(self.roles & {"training", "deterministic"})

    def spreads(self, inputs: Any) -> bool:
        """Whether `inputs` is a dict that binds by name (the rule above)."""
        return (
            isinstance(inputs, Mapping)
            and len(self.by_name) > 1
            and self.names["inputs"] in inputs
            and all(isinstance(k, str) and k in self.by_name for k in inputs)
        )

    def arguments(self, values: dict[str, Any]) -> tuple[tuple, dict]:
        """The (args, kwargs) for the function; `values` maps roles to values ("training")."""
        if "deterministic" in self.roles:
            values = {**values, "deterministic": not values["training"]}
        named: dict[str, Any] = {}
        inputs = values["inputs"]
        spread = self.spreads(inputs)
        if spread:
            named = {k: v for k, v in inputs.items() if k != self.names["inputs"]}
            values = {**values, "inputs": inputs[self.names["inputs"]]}
        missing = [name for name in self.unfilled if name not in named]
        if missing:
            raise ValueError(self._missing_message(missing, inputs, spread))
        return (
            tuple(values[role] for role in self.positional),
            {**{name: values[role] for name, role in self.keyword}, **named},
        )

    def _missing_message(self, missing: list[str], inputs: Any, spread: bool) -> str:
        names = (self.names["inputs"], *self.unfilled)
        wanted = "{" + ", ".join(f"{n!r}: ..." for n in names) + "}"
        if spread:
            given = ", ".join(repr(k) for k in inputs)
            return (
                f"{self.unfilled_error}\nThe inputs are a dict with the keys {given}; it also "
                f"needs {', '.join(repr(n) for n in missing)}: call the layer with {wanted}."
            )
        return f"{self.unfilled_error}\nOr call the layer with a dict that names them: {wanted}."


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
    reserved: Iterable[str] = (),
    wrapper_hint: Callable[[list[str], "Binding | None"], str] | None = None,
) -> Binding:
    """Reads `fn`'s parameters under the rule above; raises ValueError naming what is wrong.

    `owner` names the layer and `role` the layer argument the function came from ("method",
    "call_fn"); both appear in every error. `roles` are the names bound by name (JaxLayer's
    `params`, `state`, `rng`); "inputs" is always one. With `skip_first`, the first parameter
    (the module) is not considered. `reserved` names no dict of inputs may fill (another
    function's roles). `wrapper_hint(required, binding)` writes the fix shown when a required
    parameter cannot be filled.
    """
    roles = (*roles, "inputs")
    parameters = parameters_of(fn, owner=owner, role=role)[1 if skip_first else 0 :]
    reading = _Reading(
        roles, frozenset(reserved), named_inputs=any(p.name == "inputs" for p in parameters)
    )
    for p in parameters:
        reading.take(p)
    binding = Binding(tuple(reading.positional), tuple(reading.keyword), reading.names)
    if "inputs" not in reading.names:
        raise _no_inputs_error(fn, owner, role, parameters, skip_first)
    if not reading.unfilled:
        return dataclasses.replace(binding, by_name=reading.by_name(parameters))
    by_name = ", ".join(f"`{r}`" for r in roles[:-1])
    hint = (
        wrapper_hint(reading.unfilled, binding)
        if wrapper_hint
        else f", or rename it to the value it should receive ({by_name})."
    )
    message = _unfilled_message(fn, owner, role, reading, by_name, hint)
    named = reading.by_name(parameters)
    if not set(reading.unfilled) <= named:  # positional-only: no dict can fill it
        raise ValueError(message)
    return dataclasses.replace(
        binding, by_name=named, unfilled=tuple(reading.unfilled), unfilled_error=message
    )


@dataclasses.dataclass
class _Reading:
    """What `bind` has read of a function's parameters so far, one parameter at a time."""

    roles: tuple[str, ...]
    reserved: frozenset[str]
    named_inputs: bool  # a parameter is called `inputs`: no other one takes them by position
    positional: list[str] = dataclasses.field(default_factory=list)
    keyword: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    unfilled: list[str] = dataclasses.field(default_factory=list)
    contiguous: bool = True  # positional arguments can still be appended

    def take(self, p: inspect.Parameter) -> None:
        """Binds parameter `p` to its role, or records it as unfilled."""
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if "inputs" not in self.names and self.contiguous:
                self.positional.append("inputs")
                self.names["inputs"] = "*" + p.name
            self.contiguous = False
            return
        given = self.role_of(p)
        if given is None or (given in self.names and given not in ("training", "deterministic")):
            if p.default is inspect.Parameter.empty:
                self.unfilled.append(p.name)
            self.contiguous = False
            return
        self.names.setdefault(given, p.name)
        if self.contiguous and p.kind in _POSITIONAL:
            self.positional.append(given)
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            self.unfilled.append(p.name)
        else:
            self.keyword.append((p.name, given))

    def by_name(self, parameters: list[inspect.Parameter]) -> frozenset[str]:
        """The parameters a dict of inputs may fill: the inputs parameter and every one that
        takes no role, by keyword."""
        taken = {name for role, name in self.names.items() if role != "inputs"}
        return frozenset(
            p.name
            for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and p.name not in taken
            and p.name not in TRAINING_FLAGS
            and p.name not in self.reserved
        )

    def role_of(self, p: inspect.Parameter) -> str | None:
        """The role `p` would take by its name or position, or None."""
        if p.name in self.roles:
            return p.name
        if p.name in TRAINING_FLAGS:
            return "deterministic" if TRAINING_FLAGS[p.name] else "training"
        if "inputs" not in self.names and not self.named_inputs and p.kind in _POSITIONAL:
            return "inputs"
        return None


def _no_inputs_error(
    fn: Callable, owner: str, role: str, parameters: list[inspect.Parameter], skip_first: bool
) -> ValueError:
    taken = ", ".join(f"`{p.name}`" for p in parameters) or "no arguments"
    return ValueError(
        f"{owner}: `{role}` {describe(fn)!r} takes no argument for the inputs (it takes "
        f"{taken}). It must take `inputs`, or a first positional argument (any name"
        + (", after the one that receives the module" if skip_first else "")
        + f") that receives them: def {getattr(fn, '__name__', 'fn')}("
        + ("module, " if skip_first else "")
        + "inputs, training=False)."
    )


def _unfilled_message(
    fn: Callable, owner: str, role: str, reading: _Reading, by_name: str, hint: str
) -> str:
    shown = ", ".join(f"`{n}`" for n in reading.unfilled)
    return (
        f"{owner}: `{role}` {describe(fn)!r} takes the required argument(s) {shown}, "
        "which the layer cannot fill from these inputs. It passes the inputs to "
        f"`{reading.names['inputs']}`"
        + (f", {by_name} by name" if by_name else "")
        + ", the training flag to `training`, `train` or `is_training` and its negation to "
        f"`deterministic`; any other argument needs a default. Give {shown} a default" + hint
    )
