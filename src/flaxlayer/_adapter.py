"""The contract between the engine (`JaxLayer`) and what it wraps.

An adapter turns a model (user functions, a Linen module, an NNX module) into pure functions over
`(params, state, rng, inputs, training)`; the engine owns variables, keys and backends.
"""

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from flaxlayer._methods import Method
from flaxlayer._saving import KindCodec
from flaxlayer._variables import flatten_with_paths, format_path

SPEC_KEY = jax.ShapeDtypeStruct((2,), np.uint32)

#: Per training mode (indexed by `training`: `[False]` at inference, `[True]` in `fit`).
PerMode = tuple[bool, bool]
NEVER: PerMode = (False, False)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What building a layer needs to know about its model, learned from the inputs' shapes.

    `plan()` computes it abstractly (under `jax.eval_shape`: nothing is allocated); the engine
    reads it and never asks the adapter again.
    """

    #: Abstract (params, state) trees (`jax.ShapeDtypeStruct` leaves), or None when there is
    #: nothing to learn from (a JaxLayer given `params` and no `init_fn`).
    trees: tuple[Any, Any] | None
    #: Whether a call needs a fresh rng key, per training mode.
    needs_rng: PerMode = NEVER
    #: Whether a call returns auxiliary losses to add to the model's loss, per training mode.
    has_loss: PerMode = NEVER
    #: Flax sharding annotations: {path in the params/state tree: PartitionSpec}.
    partition_specs: Mapping[tuple[str, ...], Any] = dataclasses.field(default_factory=dict)


class Adapter(abc.ABC):
    """The contract between the engine (`JaxLayer`) and one kind of model.

    The engine owns the Keras variables, the keys, the backends and the Keras lifecycle; an
    adapter owns the model and knows how to plan, initialize and apply it as pure functions of
    `(params, state, rng, inputs, training)`, with params and state as plain pytrees.
    """

    #: Variable path prefixes for the params and state trees (so both are unique in one layer).
    params_prefix: tuple[str, ...] = ()
    state_prefix: tuple[str, ...] = ()
    #: Whether `init` takes a key (an NNX module arrives initialized).
    init_uses_rng: bool = True

    def __init__(self, owner: str):
        #: The layer, for messages: "FlaxLayer 'encoder'".
        self.owner = owner

    @abc.abstractmethod
    def plan(self, inputs: Any) -> Plan:
        """Learns what the model needs from abstract `inputs` (ShapeDtypeStructs)."""

    @abc.abstractmethod
    def init(self, rng: Any, inputs: Any) -> tuple[Any, Any]:
        """The initial (params, state) for `inputs` (concrete or abstract shapes)."""

    @abc.abstractmethod
    def given(self, initial: Any, plan: Plan, inputs: Any) -> tuple[Any, Any]:
        """Checks user-given initial values against `plan`; returns (params, state).

        Values that differ from the plan's trees are accepted where the model can still be
        applied to them (a decode cache made for a longer sequence than one call's inputs).
        """

    @abc.abstractmethod
    def apply(
        self, params: Any, state: Any, rng: Any, inputs: Any, training: bool
    ) -> tuple[Any, Any, Any]:
        """Returns (outputs, new_state, summed auxiliary losses). Pure: traced by the engine."""

    @abc.abstractmethod
    def model_name(self) -> str:
        """What the layer runs, for people: 'Linen module CNN', 'call_fn forward'."""

    def summary(self) -> str:
        """The model's configuration in one line, for errors about a loaded file."""
        return self.model_name()


class ModuleAdapter(Adapter):
    """An adapter for a Flax module (Linen or NNX): what `FlaxLayer` needs on top."""

    #: The modules this adapter takes: instances of this class.
    module_base: ClassVar[type]
    #: How a module of this kind is written to a `.keras` config and read back.
    codec: ClassVar[type[KindCodec]]
    #: Flax's own base classes, whose methods are never the method a layer calls.
    framework: tuple[type, ...] = ()
    #: The method the layer calls (resolved and bound once, at construction).
    method: Method

    def __init__(self, module: Any, method: Any, *, owner: str):
        super().__init__(owner)

    @abc.abstractmethod
    def module_object(self, values: tuple[Any, Any] | None) -> Any:
        """The module, holding `values` (params, state) when given (the layer is built)."""

    @abc.abstractmethod
    def export(self, params: Any, state: Any) -> Mapping[str, Any]:
        """The values as Flax holds them: the dict `module.init` returns, or an `nnx.State`."""

    def given_entry(self, params: Any, state: Any) -> Any:
        """The `variables=` a file restores for these (params, state) trees of shapes, where
        the module's own init would not make them; None where the module holds its own
        values (NNX)."""
        return None


def shape_mismatches(expected: Any, given: Any, *, prefix: tuple[str, ...] = ()) -> list[str]:
    """Describes every path where `given` differs from `expected` in presence or shape."""
    exp_leaves, exp_paths, _ = flatten_with_paths(expected)
    giv_leaves, giv_paths, _ = flatten_with_paths(given)
    exp = {p: leaf for p, leaf in zip(exp_paths, exp_leaves, strict=True)}
    giv = {p: leaf for p, leaf in zip(giv_paths, giv_leaves, strict=True)}
    problems = []
    for path, leaf in exp.items():
        shown = format_path(prefix + path)
        if path not in giv:
            problems.append(f"{shown}: missing (expected shape {tuple(leaf.shape)})")
        elif tuple(np.shape(giv[path])) != tuple(leaf.shape):
            problems.append(
                f"{shown}: expected shape {tuple(leaf.shape)}, given {tuple(np.shape(giv[path]))}"
            )
    for path, leaf in giv.items():
        if path not in exp:
            shown = format_path(prefix + path)
            problems.append(f"{shown}: not created by the model (given shape {np.shape(leaf)})")
    return problems


def raise_mismatches(owner: str, argument: str, problems: list[str], fix: str) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(
        f"{owner}: `{argument}` does not match what the model creates for these inputs:\n  "
        f"{shown}{more}\n{fix}"
    )
