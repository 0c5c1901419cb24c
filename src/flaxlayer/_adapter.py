"""The contract between the engine (`JaxLayer`) and what it wraps.

An adapter turns a model (user functions, a Linen module, an NNX module) into pure functions over
`(params, state, rng, inputs, training)`; the engine owns variables, keys and backends.
"""

from typing import Any

import jax
import numpy as np

from flaxlayer._variables import flatten_with_paths, format_path

SPEC_KEY = jax.ShapeDtypeStruct((2,), np.uint32)


class Adapter:
    """Base class; the defaults describe a model with no randomness, no state and no losses."""

    #: Variable path prefixes for the params and state trees (so both are unique in one layer).
    params_prefix: tuple[str, ...] = ()
    state_prefix: tuple[str, ...] = ()
    #: Whether `init` takes a key (an NNX module arrives initialized).
    init_uses_rng: bool = True

    def __init__(self, owner: str):
        self.owner = owner
        self.needs_rng = {False: False, True: False}
        self.has_loss = {False: False, True: False}

    def plan(self, inputs: Any) -> tuple[Any, Any] | None:
        """Learns what the model needs from abstract `inputs`; returns abstract (params, state).

        Runs only under `jax.eval_shape`: nothing is allocated. None when there is nothing to
        learn from (e.g. a JaxLayer given `params` and no `init_fn`).
        """
        return None

    def init(self, rng: Any, inputs: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def apply(self, params: Any, state: Any, rng: Any, inputs: Any, training: bool):
        """Returns (outputs, new_state, summed auxiliary losses)."""
        raise NotImplementedError

    def given(self, initial: Any, expected: tuple[Any, Any] | None, inputs: Any) -> tuple[Any, Any]:
        """Checks user-given initial values; returns (params, state).

        `expected` is what `plan(inputs)` returned; values that differ from it are accepted
        where the model can still be applied to them (a decode cache made for a longer
        sequence than one call's inputs).
        """
        raise NotImplementedError

    def partition_specs(self) -> dict[tuple[str, ...], Any]:
        """Flax sharding annotations: {path in the params/state tree: PartitionSpec}."""
        return {}

    def model_name(self) -> str:
        """What the layer runs, for people: 'Linen module CNN', 'call_fn forward'."""
        return ""

    def summary(self) -> str:
        """The model's configuration in one line, for errors about a loaded file."""
        return self.model_name()


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
