"""Adapter for JaxLayer: user-written `call_fn` / `init_fn` (plain JAX, Haiku, ...)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flaxlayer._adapter import SPEC_KEY, Adapter, Plan, raise_mismatches, shape_mismatches
from flaxlayer._signature import Binding, bind, describe

CALL_ROLES = ("params", "state", "rng")
INIT_ROLES = ("rng",)


class FunctionAdapter(Adapter):
    params_prefix = ("params",)
    state_prefix = ("state",)

    def __init__(
        self,
        call_fn: Callable,
        init_fn: Callable | None,
        *,
        has_params: bool,
        has_state: bool,
        owner: str,
    ):
        super().__init__(owner)
        if not callable(call_fn):
            raise TypeError(f"{owner}: call_fn must be callable; got {call_fn!r}.")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"{owner}: init_fn must be callable or None; got {init_fn!r}.")
        self.call_fn, self.init_fn = call_fn, init_fn
        self.call_binding = bind(call_fn, owner=owner, role="call_fn", roles=CALL_ROLES)
        self.init_binding = (
            bind(init_fn, owner=owner, role="init_fn", roles=INIT_ROLES, reserved=CALL_ROLES)
            if init_fn is not None
            else None
        )
        self.call_args = self.call_binding.roles
        self.uses_state = "state" in self.call_args
        takes = [name for name in ("params", "state") if name in self.call_args]
        if takes and init_fn is None and not (has_params or has_state):
            # As keras.layers.JaxLayer: with one of params/state given the other starts empty.
            raise ValueError(
                f"{owner}: `call_fn` {describe(call_fn)!r} takes "
                f"{' and '.join(f'`{n}`' for n in takes)}, but `init_fn`, `params` and `state` "
                "are all None, so there is nothing to start from. Pass an `init_fn` that "
                "creates them, or initial values with `params=` (and `state=`)."
            )
        self.uses_rng = "rng" in self.call_args

    def _init_call(self, rng, inputs):
        # As keras.layers.JaxLayer does, and as Haiku's BatchNorm needs to create its averages.
        init_fn, binding = self._init_with()
        args, kwargs = binding.arguments({"rng": rng, "inputs": inputs, "training": True})
        result = init_fn(*args, **kwargs)
        if not self.uses_state:
            return result, {}
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ValueError(
                f"{self.owner}: `call_fn` takes `state`, so `init_fn` "
                f"{describe(init_fn)!r} must return a tuple (params, state); it returned "
                f"{type(result).__name__}."
            )
        return result

    def _init_with(self) -> tuple[Callable, Binding]:
        """`init_fn` and how it is called (only asked for when the layer has an `init_fn`)."""
        if self.init_fn is None or self.init_binding is None:
            raise RuntimeError(f"{self.owner}: there is no init_fn to create the variables with.")
        return self.init_fn, self.init_binding

    def model_name(self) -> str:
        name = getattr(self.call_fn, "__qualname__", None) or getattr(self.call_fn, "__name__", "")
        return f"call_fn {name}" if name else ""

    def plan(self, inputs):
        trees = None if self.init_fn is None else jax.eval_shape(self._init_call, SPEC_KEY, inputs)
        return Plan(trees=trees, needs_rng=(self.uses_rng, self.uses_rng))

    def init(self, rng, inputs):
        return self._init_call(rng, inputs)

    def given(self, initial, plan, inputs):
        expected = plan.trees
        params, state = initial
        params = {} if params is None else params
        state = {} if state is None else state
        if expected is not None:
            fix = (
                "Pass values created by init_fn for inputs of this shape, or leave them "
                "unset to initialize at build time."
            )
            if "params" in self.call_args:
                raise_mismatches(
                    self.owner,
                    "params",
                    shape_mismatches(expected[0], params, prefix=("params",)),
                    fix,
                )
            if self.uses_state:
                raise_mismatches(
                    self.owner,
                    "state",
                    shape_mismatches(expected[1], state, prefix=("state",)),
                    fix,
                )
        return params, state

    def apply(self, params, state, rng, inputs, training):
        args, kwargs = self.call_binding.arguments(
            {"params": params, "state": state, "rng": rng, "inputs": inputs, "training": training}
        )
        result = self.call_fn(*args, **kwargs)
        if not self.uses_state:
            return result, state, jnp.zeros((), jnp.float32)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ValueError(
                f"{self.owner}: `call_fn` {describe(self.call_fn)!r} takes `state`, so it must "
                f"return a tuple (outputs, new_state); it returned {type(result).__name__}."
            )
        outputs, new_state = result
        return outputs, new_state, jnp.zeros((), jnp.float32)
