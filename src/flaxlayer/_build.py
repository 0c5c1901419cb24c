"""Building a layer: the module's initial values, their layouts, and the variables they become.

Free functions over the adapter's `Plan`; `JaxLayer.build` calls `start` (the plan, the
variables' layouts, then `initial_trees` for a fresh build or the plan's abstract trees for a
build from a file), then `create_module_variables`.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import keras
import numpy as np

from flaxlayer._adapter import Adapter, Plan
from flaxlayer._bridges import initial_value
from flaxlayer._compat import in_stateless_scope
from flaxlayer._distribution import (
    active_distribution,
    backend_sharding,
    current_scope_path,
    variable_layouts,
)
from flaxlayer._program import (
    JIT_INIT_BYTES,
    abstract,
    init_key,
    init_without_forward,
    nbytes,
    zeros,
)
from flaxlayer._store import LayerVariables, VariableFactory
from flaxlayer._variables import TreeLayout, flatten_with_paths


@dataclasses.dataclass(frozen=True)
class Blueprint:
    """What an unbuilt layer will be built from: the given (params, state), the inputs' spec
    (known from the first call or the file's build config), and a file's `finetune` entry.

    Held in a record, off Keras's attribute tracking, which would wrap the user's dicts and
    tuples into its own tracked containers (JAX then sees other pytrees).
    """

    given: Any = None
    inputs_spec: Any = None
    finetune: Any = None

    def but(self, **changes: Any) -> "Blueprint":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class BuildInputs:
    """What a build learned once, kept for a later first use of a layer loaded from a file."""

    plan: Plan
    #: The abstract inputs (ShapeDtypeStructs) the plan was made for.
    inputs: Any
    #: The user's or the file's (params, state), or None.
    initial: Any
    #: The seed of the init key.
    seed: int
    #: {variable path parts: TensorLayout} under a keras.distribution, else None.
    layouts: dict | None = None

    def without_initial(self) -> "BuildInputs":
        return dataclasses.replace(self, initial=None)


def start(
    adapter: Adapter, given: Any, inputs: Any, seed: int, owner: str, from_file: bool
) -> tuple[BuildInputs, tuple[Any, Any]]:
    """Plans the build for abstract `inputs`, and the (params, state) it starts from: the
    given values or the module's init; abstract ones for a layer from a file (nothing the
    file sizes is allocated: the weights file fills them)."""
    # Keras may build inside its own symbolic trace (a subclassed model first seen by fit):
    # initial values must still be concrete there, and only there (op-by-op evaluation of the
    # initializers costs time and memory).
    now = jax.ensure_compile_time_eval if in_stateless_scope() else contextlib.nullcontext
    with now():
        plan = adapter.plan(inputs)
        layouts = plan_layouts(adapter, plan, owner)
        build = BuildInputs(plan, inputs, given, seed, layouts)
        if from_file:
            trees = adapter.given(given, plan, inputs) if given is not None else plan.trees
            return build, abstract(trees if trees is not None else ({}, {}))
        return build.without_initial(), initial_trees(adapter, build)


def plan_layouts(adapter: Adapter, plan: Plan, owner: str) -> dict | None:
    """{variable path parts: TensorLayout} under a keras.distribution, else None."""
    distribution = active_distribution()
    expected = plan.trees
    if distribution is None or expected is None:
        return None
    base = tuple(p for p in current_scope_path().split("/") if p)
    parts, shapes = [], []
    for tree, prefix in zip(expected, (adapter.params_prefix, adapter.state_prefix), strict=True):
        leaves, paths, _ = flatten_with_paths(tree)
        parts += [prefix + p for p in paths]
        shapes += [tuple(leaf.shape) for leaf in leaves]
    specs = {"/".join(base + k): v for k, v in plan.partition_specs.items()}
    layouts = variable_layouts(
        distribution, ["/".join(base + p) for p in parts], shapes, specs, owner=owner
    )
    return dict(zip(parts, layouts, strict=True))


def initial_trees(adapter: Adapter, build: BuildInputs) -> tuple[Any, Any]:
    """The (params, state) a fresh build starts from: given values or the model's init."""
    plan, inputs, layouts = build.plan, build.inputs, build.layouts
    if build.initial is not None:
        return adapter.given(build.initial, plan, inputs)
    if plan.trees is None:
        return {}, {}
    if not adapter.init_uses_rng:  # the values exist already (an NNX module)
        return adapter.init(None, inputs)
    rng = init_key(build.seed)
    if layouts:
        # Each leaf is created already sharded, never whole on one device.
        shardings = _sharding_trees(plan.trees, layouts, adapter)
        return jax.jit(adapter.init, out_shardings=shardings)(rng, zeros(inputs))
    if nbytes(plan.trees) <= JIT_INIT_BYTES:
        # One compiled program (XLA drops the forward pass) builds a small model about twice
        # as fast as op-by-op evaluation; a large one is built op by op, which keeps the peak
        # near the parameters' size.
        try:
            return jax.jit(lambda key: init_without_forward(adapter.init, key, inputs))(rng)
        except jax.errors.ConcretizationTypeError:
            pass  # an init that branches on values runs op by op
    return init_without_forward(adapter.init, rng, inputs)


def _sharding_trees(expected: tuple[Any, Any], layouts: dict, adapter: Adapter) -> tuple:
    """Out-shardings for `init`, shaped like its (params, state) result."""
    trees = []
    for tree, prefix in zip(expected, (adapter.params_prefix, adapter.state_prefix), strict=True):
        _, paths, treedef = flatten_with_paths(tree)
        trees.append(treedef.unflatten([backend_sharding(layouts[prefix + p]) for p in paths]))
    return tuple(trees)


def create_module_variables(
    factory: VariableFactory,
    store: LayerVariables,
    dtype_for: Callable[[Any], Any],
    copy: bool,
    first_value: Callable[[int], Callable] | None,
) -> None:
    """Creates the module's variables from `store`'s tree layouts, params then state.

    Each leaf is handed over as its variable is made, so the values are never held twice (a
    1 GiB model stays ~1 GiB). Without `copy` a variable takes over its array (Keras's JAX
    trainer donates variable buffers); with it, each leaf is copied. With `first_value` the
    leaves are abstract: variable `i` is created without a value, `first_value(i)` being its
    initializer (a layer loaded from a file).
    """
    for layout, prefix, param in (
        (store.params_layout, store.params_prefix, True),
        (store.state_layout, store.state_prefix, False),
    ):
        leaves = layout.take_leaves()
        offset = len(store.param_vars) + len(store.state_vars)
        created = store.param_vars if param else store.state_vars
        for i, full in enumerate(_variable_paths(layout, prefix, factory.owner)):
            value, leaves[i] = _leaf_value(leaves[i], first_value is not None, copy), None
            created.append(
                factory.create(
                    full,
                    tuple(value.shape),
                    dtype_for(value.dtype),
                    value if first_value is None else first_value(offset + i),
                    param=param,
                    trainable=param,
                    layout=store.layouts.get(full) if store.layouts else None,
                    deferred=first_value is not None,
                )
            )
            del value


def _variable_paths(layout: TreeLayout, prefix: tuple[str, ...], owner: str) -> list:
    paths = [prefix + (parts or ("value",)) for parts in layout.paths]
    seen: set[tuple[str, ...]] = set()
    for full in paths:
        if full in seen:
            raise ValueError(
                f"{owner}: two leaves map to the variable path {'/'.join(full)!r}. "
                "Give the tree's entries distinct names."
            )
        seen.add(full)
    return paths


def _leaf_value(leaf: Any, abstract: bool, copy: bool) -> Any:
    if isinstance(leaf, (bool, int, float)):  # as keras.layers.JaxLayer: layer dtypes
        return np.asarray(leaf, keras.backend.standardize_dtype(type(leaf)))
    if abstract:
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
    return initial_value(leaf, copy=copy)
