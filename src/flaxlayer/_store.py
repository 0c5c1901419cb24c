"""The variables part of a layer: its Keras variables, where each sits in the Flax trees, and
the one factory that creates them.

`LayerVariables` owns a built layer's variables: the module's params and state (in the order
of their trees' leaves), the parameter transforms' extras (LoRA adapters, int8 scales), the
trees' layouts and the variables' `keras.distribution` layouts. `VariableFactory` creates every
one of them, for the build and for fine-tuning alike, with one naming rule and one autocast rule.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras

from flaxlayer import _compat
from flaxlayer._bridges import jax_copy
from flaxlayer._describe import VariableGroup
from flaxlayer._specs import Leaf, dtype_name
from flaxlayer._transforms import Applied, Int8, Transform, module_params
from flaxlayer._variables import TreeLayout, format_path, is_float_dtype


@dataclasses.dataclass
class Extra:
    """A transform on module param `index` and the Keras variables holding its extras."""

    index: int
    transform: Transform
    variables: list
    #: For LoRA: whether the base kernel was trainable before (restored by `merge_lora`).
    base_trainable: bool = True


@dataclasses.dataclass
class LayerVariables:
    """A built layer's variables and where each sits in the trees the module sees."""

    params_layout: TreeLayout
    state_layout: TreeLayout
    #: Path prefixes of the params and state trees (`("params",)`; `()` for NNX).
    params_prefix: tuple[str, ...]
    state_prefix: tuple[str, ...]
    #: {variable path parts: TensorLayout} under a keras.distribution, else None.
    layouts: dict | None = None
    param_vars: list = dataclasses.field(default_factory=list)
    state_vars: list = dataclasses.field(default_factory=list)
    #: Parameter transforms in the order applied, with their variables.
    extras: list[Extra] = dataclasses.field(default_factory=list)

    @classmethod
    def from_trees(cls, trees: tuple[Any, Any], adapter: Any, layouts: dict | None):
        """Empty, for the (params, state) `trees` of `adapter`'s model (variables come next)."""
        params, state = TreeLayout(trees[0]), TreeLayout(trees[1])
        return cls(params, state, adapter.params_prefix, adapter.state_prefix, layouts)

    @property
    def extra_vars(self) -> list:
        return [v for extra in self.extras for v in extra.variables]

    @property
    def stored_params(self) -> list:
        """What the compiled call takes as params: the module's, then the transforms'."""
        return self.param_vars + self.extra_vars

    @property
    def all_vars(self) -> list:
        """Every variable, in the order of the weights file (transforms' last, so that adding
        one never moves another)."""
        return self.param_vars + self.state_vars + self.extra_vars

    def variable_parts(self, index: int) -> tuple[str, ...]:
        """Module param `index`'s path under the layer (`params/Dense_0/kernel`)."""
        return self.params_prefix + (self.params_layout.paths[index] or ("value",))

    def param_paths(self) -> list[str]:
        return [format_path(self.variable_parts(i)) for i in range(len(self.param_vars))]

    def extra_paths(self) -> list[tuple[str, ...]]:
        """The transforms' variables as paths under the layer (`lora/params/.../a`)."""
        return [
            (extra.transform.kind, *self.variable_parts(extra.index), name)
            for extra in self.extras
            for name in extra.transform.extras
        ]

    def layout(self, index: int) -> Any:
        return self.layouts.get(self.variable_parts(index)) if self.layouts else None

    def on(self, index: int, kind: type[Transform]) -> Extra | None:
        """The transform of type `kind` on module param `index`, if there is one."""
        return next(
            (e for e in self.extras if e.index == index and isinstance(e.transform, kind)), None
        )

    def module_dtype(self, index: int) -> str:
        """The dtype module param `index` has as the module sees it (an int8 kernel's float)."""
        int8 = self.on(index, Int8)
        if int8 is not None:
            assert isinstance(int8.transform, Int8)
            return int8.transform.dtype
        return keras.backend.standardize_dtype(self.param_vars[index].dtype)

    def applied(self) -> tuple[Applied, ...]:
        """The transforms with the stored indices of their extras (after the module's)."""
        out, offset = [], len(self.param_vars)
        for extra in self.extras:
            n = len(extra.variables)
            out.append(Applied(extra.index, extra.transform, tuple(range(offset, offset + n))))
            offset += n
        return tuple(out)

    def groups(self) -> tuple[VariableGroup, ...]:
        """The variables by tree, with their paths, for `describe`."""
        return (
            VariableGroup(self.params_prefix, self.params_layout.paths, self.param_vars),
            VariableGroup(self.state_prefix, self.state_layout.paths, self.state_vars),
            VariableGroup((), self.extra_paths(), self.extra_vars),
        )

    def shapes(self) -> tuple[Any, Any]:
        """The (params, state) trees of `Leaf` shapes and dtypes, as the module sees them (an
        int8 kernel as its float), from the variables themselves (never mapped over as
        pytrees: in Keras's NNX mode a variable is a pytree node)."""
        params = [Leaf(tuple(v.shape), self.module_dtype(i)) for i, v in enumerate(self.param_vars)]
        state = [Leaf(tuple(v.shape), dtype_name(v)) for v in self.state_vars]
        return self.params_layout.unflatten(params), self.state_layout.unflatten(state)

    def module_values(self) -> tuple[Any, Any]:
        """Copies of the current values as the module sees them, as JAX arrays: snapshots
        the caller may keep (Keras's JAX trainer donates the variables' buffers to each
        compiled step, so a view would be deleted by the next `fit`)."""
        stored = [jax_copy(v.value) for v in self.stored_params]
        state = [jax_copy(v.value) for v in self.state_vars]
        params = module_params(stored, self.applied(), len(self.param_vars))
        return self.params_layout.unflatten(params), self.state_layout.unflatten(state)

    def positions(self, tracked: Sequence[Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where the stored params and the state are in the layer's tracked variables."""
        where = {id(v): i for i, v in enumerate(tracked)}
        return (
            tuple(where[id(v)] for v in self.stored_params),
            tuple(where[id(v)] for v in self.state_vars),
        )


@dataclasses.dataclass(frozen=True)
class VariableFactory:
    """Creates and drops the variables of one layer.

    A variable is named `<layer>/<parts>` (name scopes, so that `LayoutMap` and
    `model.summary()` see the Flax path); it is trainable only if asked and a float; Keras
    autocasts exactly the float variables the compiled call takes as params (module params
    and transform extras), while state is cast inside the compiled call (torch's
    `Variable.assign` under an autocast scope writes into a cast copy, losing the update).
    """

    layer: Any

    @property
    def owner(self) -> str:
        """The layer, as messages name it: "FlaxLayer 'encoder'"."""
        return self.layer._owner_name()

    def create(
        self,
        parts: tuple[str, ...],
        shape: tuple[int, ...],
        dtype: Any,
        initializer: Any,
        *,
        param: bool,
        trainable: bool,
        layout: Any = None,
        deferred: bool = False,
    ) -> keras.Variable:
        """A variable at `parts`; `initializer` is an array or a Keras initializer. With
        `deferred`, it is created without a value and `initializer` runs at its first read."""
        floating = is_float_dtype(dtype)
        if _compat.in_stateless_scope() and not callable(initializer):
            initializer = _constant(initializer)  # Keras only takes a callable there
        with contextlib.ExitStack() as scope:
            if deferred:
                scope.enter_context(keras.StatelessScope(initialize_variables=False))
            scope.enter_context(keras.name_scope(self.layer.name, caller=self.layer))
            for part in parts[:-1]:
                scope.enter_context(keras.name_scope(part))
            variable = keras.Variable(
                initializer=initializer,
                shape=shape,
                name=parts[-1],
                dtype=keras.backend.standardize_dtype(dtype),
                trainable=trainable and floating,
                autocast=floating and param,
                layout=layout,
            )
            with _compat.unlocked_tracker(self.layer):
                _compat.track_variable(self.layer, variable)
        if deferred:
            _compat.forget_uninitialized([variable])
        return variable

    def drop(self, variables: Sequence[Any]) -> None:
        with _compat.unlocked_tracker(self.layer):
            for variable in variables:
                _compat.untrack_variable(self.layer, variable)


def _constant(value: Any) -> Callable:
    return lambda shape, dtype: value


def struct_of(x: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a variable or array, as JAX names the dtype."""
    return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(keras.backend.standardize_dtype(x.dtype)))
