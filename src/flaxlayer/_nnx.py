"""Adapter for `flax.nnx` modules.

The module is split once into its graph structure and three states: `nnx.Param` (trainable),
rng state (`RngKey`/`RngCount`, re-keyed from the layer's seed on every call, so never stored),
and everything else (BatchStat, caches, user Variable types: non-trainable, written back). Each
call merges a fresh copy of the module from the current values, so the user's module object is
never put in another mode; at build its arrays move into the layer's variables and it is left
holding `MovedArray`s, which say so when used. `NNXCodec` writes a module's object graph to a
`.keras` file and reads it back.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxlayer._adapter import ModuleAdapter, Plan, raise_mismatches, shape_mismatches
from flaxlayer._compat import (
    key_impl_name,
    nnx_node_attributes,
    nnx_node_without_init,
    replace_variable_value,
)
from flaxlayer._methods import resolve_method
from flaxlayer._saving import MAX_DEPTH, TAG, KindCodec, declared_types, schema
from flaxlayer._specs import MAX_DIMENSION

_DEFAULT_IMPL = "threefry2x32"
_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
_HOOK_KEYS = ("on_get_value", "on_set_value", "on_create_value", "on_add_axis", "on_remove_axis")


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _split_state(module: nnx.Module):
    return nnx.split(module, nnx.Param, nnx.RngState, ...)


class _StateLayout:
    """A State's treedef plus, for each leaf, its attribute path: pure dict <-> nnx.State."""

    def __init__(self, state: nnx.State):
        with_path, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.paths = [
            tuple(k.key if hasattr(k, "key") else k.idx for k in kp if not hasattr(k, "name"))
            for kp, _ in with_path
        ]

    def to_pure(self, leaves: list) -> dict:
        pure: dict = {}
        for path, leaf in zip(self.paths, leaves, strict=True):
            node = pure
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
        return pure

    def from_pure(self, pure: dict) -> nnx.State:
        leaves = []
        for path in self.paths:
            node = pure
            for key in path:
                node = node[key]
            leaves.append(node)
        return jax.tree.unflatten(self.treedef, leaves)


def _leaves_at(tree: dict, paths: list) -> list:
    leaves = []
    for path in paths:
        node = tree
        for key in path:
            node = node[key]
        leaves.append(node)
    return leaves


def _flat_values(state: nnx.State) -> dict:
    return {tuple(path): var.get_value() for path, var in state.flat_state()}


class MovedArray:
    """What a wrapped module holds once its arrays have moved into a layer's variables.

    Any use as an array (JAX, NumPy, indexing, arithmetic) raises `RuntimeError` saying where
    the values went, instead of JAX's "Array has been deleted" once Keras donated the buffers.
    `shape` and `dtype` stay readable, and `nnx.update` replaces it like any value.
    """

    def __init__(self, shape: tuple, dtype: Any, message: str):
        self.shape, self.dtype, self._message = shape, dtype, message

    def _refuse(self, *args: Any, **kwargs: Any):
        raise RuntimeError(self._message)

    __jax_array__ = __array__ = __getitem__ = __setitem__ = __iter__ = __len__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __matmul__ = __rmatmul__ = __truediv__ = __rtruediv__ = __neg__ = __pow__ = _refuse
    __float__ = __int__ = __bool__ = _refuse

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(self._message)

    def __repr__(self) -> str:
        return f"MovedArray(shape={self.shape}, dtype={self.dtype})"


def _moved_message(module: nnx.Module, owner: str, path: tuple) -> str:
    name = type(module).__name__
    where = ".".join(str(p) for p in path)
    return (
        f"This {name} object's arrays were moved into the variables of {owner} when that "
        f"layer was built (`{where}` is one of them), so it holds no values any more. Use the "
        "layer's:\n"
        f"    module = layer.module  # a new {name} with the layer's current values\n"
        "or put them back into this object:\n"
        "    nnx.update(module, layer.flax_variables)"
    )


def _mark_moved(module: nnx.Module, owner: str) -> None:
    """Replaces the module's non-rng variable values by `MovedArray`s."""
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState):
            value = node.get_value()
            if hasattr(value, "shape") and hasattr(value, "dtype"):
                message = _moved_message(module, owner, path)
                replace_variable_value(node, MovedArray(tuple(value.shape), value.dtype, message))


class NNXCodec(KindCodec):
    """An NNX module in a config: its object graph (classes, attributes, variable types, shapes
    and metadata); variable values travel in the weights file.

    A node reachable twice is written once and referenced after. Loading rebuilds nodes as NNX
    itself does in `nnx.merge` (no `__init__`), with abstract variables that the weights fill.
    """

    entries = schema(
        ("nnx_node", {"id", "class", "attributes"}, {"data"}),
        ("nnx_ref", {"id"}, ()),
        ("nnx_variable", {"class", "shape", "metadata"}, {"dtype", "key_impl"}),
    )
    class_bases = (nnx.Module, nnx.Variable)
    module_base = nnx.Module

    def __init__(self, coder: Any):
        super().__init__(coder)
        self._ids: dict[int, int] = {}  # saving: id(node) -> node id
        self._nodes: dict[int, Any] = {}  # loading: node id -> node
        self._shapes: dict[bool, list[tuple[tuple, tuple]]] = {True: [], False: []}

    @classmethod
    def encodes(cls, value: Any) -> bool:
        return isinstance(value, (nnx.Pytree, nnx.Variable))

    # ------------------------------------------------------------------------------ saving

    def encode(self, value: Any, where: str) -> dict:
        if isinstance(value, nnx.Variable):
            return self._encode_variable(value, where)
        if id(value) in self._ids:
            return {TAG: "nnx_ref", "id": self._ids[id(value)]}
        self._ids[id(value)] = index = len(self._ids)
        cls: type = type(value)
        ref = self.coder.class_ref(cls, where, instantiated=True)
        declared = declared_types(cls, with_init=True)
        own, data = nnx_node_attributes(value)
        attributes = {
            name: self.coder.value(attribute, f"{cls.__name__}.{name}", declared=declared.get(name))
            for name, attribute in own.items()
        }
        return {TAG: "nnx_node", "id": index, "class": ref, "attributes": attributes, "data": data}

    def _encode_variable(self, variable: nnx.Variable, where: str) -> dict:
        value = variable.get_value()
        metadata = {k: v for k, v in variable.get_metadata().items() if k not in _HOOK_KEYS}
        entry = {
            TAG: "nnx_variable",
            "class": self.coder.class_ref(type(variable), where),
            "shape": list(np.shape(value)),
            "metadata": self.coder.value(metadata, where),
        }
        if _is_key(value):
            entry["key_impl"] = str(jax.random.key_impl(value))
        else:
            entry["dtype"] = np.dtype(value.dtype).name
        return entry

    # ----------------------------------------------------------------------------- loading

    def check(self, data: dict, path: tuple, depth: int, declared: Any) -> None:
        kind = data[TAG]
        if kind == "nnx_node":
            self._check_node(data, path, depth)
        elif kind == "nnx_ref":
            if data["id"] not in self._nodes:
                raise self.coder.fail(
                    path, "it refers to an NNX node the file does not define before it."
                )
        else:
            self._check_variable(data, path, depth)

    def _check_node(self, data: dict, path: tuple, depth: int) -> None:
        decoder = self.coder
        cls = decoder.check_class(data, path, (nnx.Pytree,), "an NNX module or graph node class")
        decoder.instantiated(cls)
        if type(data["id"]) is not int or data["id"] != len(self._nodes):
            raise decoder.fail(
                (*path, "id"),
                f"node id {str(data['id'])[:40]!r} is not {len(self._nodes)}: the ids count up "
                "from 0 in the order the file defines its nodes (a tampered file).",
            )
        self._nodes[data["id"]] = None
        attributes, flags = data["attributes"], data.get("data")
        if not isinstance(attributes, dict):
            raise decoder.fail((*path, "attributes"), "attributes must be a mapping.")
        _check_data_flags(decoder, flags, attributes, path)
        node_types = declared_types(cls, with_init=True)
        for name, value in attributes.items():
            if not (name.isidentifier() or name.isdigit()) or name.startswith("__"):
                raise decoder.fail(
                    (*path, "attributes", name), "not a plain attribute name (tampered file)."
                )
            _check_size(decoder, name, value, node_types.get(name), (*path, "attributes", name))
            decoder.check_declared(
                value, (*path, "attributes", name), depth + 1, node_types.get(name)
            )

    def _check_variable(self, data: dict, path: tuple, depth: int) -> None:
        decoder = self.coder
        cls = decoder.check_class(data, path, (nnx.Variable,), "an NNX Variable type")
        shape = data["shape"]
        if not (
            isinstance(shape, list)
            and len(shape) <= 32
            and all(type(d) is int and 0 <= d < MAX_DIMENSION for d in shape)
        ):
            raise decoder.fail(
                (*path, "shape"),
                f"{str(shape)[:200]} is not a shape (a list of sizes, each in [0, 2**31)).",
            )
        self._shapes[issubclass(cls, nnx.RngState)].append((path, tuple(shape)))
        if ("dtype" in data) == ("key_impl" in data):
            raise decoder.fail(path, "a variable entry needs exactly one of dtype and key_impl.")
        if "dtype" in data:
            decoder.dtype(data["dtype"], (*path, "dtype"))
        elif data["key_impl"] not in _KEY_IMPLS:
            raise decoder.fail((*path, "key_impl"), f"{data['key_impl']!r} is not a JAX key type.")
        self._check_plain(data["metadata"], (*path, "metadata"), depth + 1)

    def _check_plain(self, data: Any, path: tuple, depth: int) -> None:
        """Variable metadata: plain data only (no functions, classes or hooks)."""
        if depth > MAX_DEPTH:
            raise self.coder.fail(path, f"it is nested deeper than {MAX_DEPTH} levels.")
        if isinstance(data, list):
            for i, v in enumerate(data):
                self._check_plain(v, (*path, i), depth + 1)
            return
        if not isinstance(data, dict) or data.get(TAG) in ("float", "dtype", "enum"):
            self.coder.check(data, path, depth, None)
            return
        for i, pair in enumerate(self._plain_pairs(data, path)):
            self._check_plain_pair(pair, (*path, "items", i), depth)

    def _plain_pairs(self, data: dict, path: tuple) -> list:
        """The [key, value] pairs of a mapping or tuple entry in variable metadata."""
        kind = data.get(TAG)
        if kind is None:
            return [[k, v] for k, v in data.items()]
        if kind in ("tuple", "dict", "frozendict") and set(data) == {TAG, "items"}:
            pairs = data["items"] if kind != "tuple" else [[None, v] for v in data["items"]]
            if not isinstance(pairs, list):
                raise self.coder.fail(path, "items must be a list.")
            return pairs
        raise self.coder.fail(path, f"variable metadata holds only plain data, not {kind!r}.")

    def _check_plain_pair(self, pair: Any, path: tuple, depth: int) -> None:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise self.coder.fail(path, "not a [key, value] pair.")
        if pair[0] in _HOOK_KEYS:
            raise self.coder.fail(path, f"variable hooks ({pair[0]}) are not loaded.")
        self._check_plain(pair[0], (*path, 0), depth + 1)
        self._check_plain(pair[1], (*path, 1), depth + 1)

    def finish_check(self) -> None:
        """NNX rng state is re-made on every call at its recorded shape, and the weights file
        does not hold it: its shape must be the leading part of a variable's shape that the
        file does hold (keys split for `nnx.vmap`-ed layers), or a scalar."""
        held = [shape for _, shape in self._shapes[False]]
        for path, shape in self._shapes[True]:
            if shape and not any(s[: len(shape)] == shape for s in held):
                raise self.coder.fail(
                    (*path, "shape"),
                    f"an rng state of shape {list(shape)} matches no variable the weights file "
                    "holds (rng keys are scalars, or split along a leading axis of stacked "
                    "layers); the file may have been tampered with.",
                )

    def decode(self, data: dict, path: tuple) -> Any:
        kind = data[TAG]
        if kind == "nnx_ref":
            return self._nodes[data["id"]]
        if kind == "nnx_variable":
            return self._decode_variable(data, path)
        cls = self.coder.class_of(data)
        # As NNX itself rebuilds a node in nnx.merge: no __init__, attributes set directly.
        node = nnx_node_without_init(cls, data.get("data"))
        self._nodes[data["id"]] = node
        for name, value in data["attributes"].items():
            object.__setattr__(node, name, self.coder.value(value, (*path, "attributes", name)))
        return node

    def _decode_variable(self, data: dict, path: tuple) -> nnx.Variable:
        cls = self.coder.class_of(data)
        shape = tuple(data["shape"])
        if "key_impl" in data:
            impl = data["key_impl"]
            value = jax.eval_shape(
                lambda: (
                    jax.random.split(jax.random.key(0, impl=impl), shape)
                    if shape
                    else jax.random.key(0, impl=impl)
                )
            )
        else:
            # Abstract: the weights file holds the values, checked against this shape.
            value = jax.ShapeDtypeStruct(shape, self.coder.dtype(data["dtype"], path))
        metadata = self.coder.value(data["metadata"], (*path, "metadata"))
        return self.coder.construct(
            path, lambda: cls.from_metadata(value, metadata), f"an NNX {cls.__name__}"
        )


#: NNX's own flags in a node's `data` entry (not attributes of the module).
_OWN_FLAG_PREFIX = "_pytree__"
#: The attribute names that hold a size: declared `int`, they are never negative.
_SIZE_NAME = re.compile(r"(features|size|dim|dims|width|heads|rank)$|^num_")


def _check_data_flags(decoder: Any, flags: Any, attributes: dict, path: tuple) -> None:
    """A node's `data` entry, when the file has one, flags exactly its attributes (and NNX's
    own `_pytree__` entries) true or false."""
    if flags is None:
        return  # written by a Flax that records none
    if not (isinstance(flags, dict) and all(isinstance(v, bool) for v in flags.values())):
        raise decoder.fail((*path, "data"), "data must map attribute names to true/false.")
    named = {k for k in flags if not k.startswith(_OWN_FLAG_PREFIX)}
    if named != set(attributes):
        differ = sorted(named ^ set(attributes))
        raise decoder.fail(
            (*path, "data"),
            f"data flags the attributes {sorted(named)}, the node has {sorted(attributes)} "
            f"({', '.join(differ)} differ): a tampered file.",
        )


def _check_size(decoder: Any, name: str, value: Any, declared: Any, path: tuple) -> None:
    """An attribute its class declares `int` whose name says it is a size
    (`out_features`, `num_heads`, `hidden_size`) is a non-negative integer."""
    if declared is int and _SIZE_NAME.search(name) and not (type(value) is int and value >= 0):
        raise decoder.fail(path, f"{str(value)[:60]} is not a size (an integer >= 0).")


class NNXAdapter(ModuleAdapter):
    init_uses_rng = False
    framework = nnx.Module.__mro__
    module_base = nnx.Module
    codec = NNXCodec

    def __init__(self, module: nnx.Module, method: Any, *, owner: str):
        super().__init__(module, method, owner=owner)
        self.module_class = type(module)
        self.method = resolve_method(module, method, owner=owner, framework=self.framework)
        self._module: nnx.Module | None = module
        self.graphdef, params, rngs, rest = _split_state(module)
        for leaf in jax.tree.leaves((params, rest)):
            if isinstance(leaf, MovedArray):
                raise ValueError(f"{owner}: cannot wrap this module. {leaf._message}")
        self.params_layout = _StateLayout(params)
        self.state_layout = _StateLayout(rest)
        self.rngs_layout = _StateLayout(rngs)
        self.rng_leaves = [
            ("key", tuple(x.shape), key_impl_name(x))
            if _is_key(x)
            else ("count", tuple(x.shape), x.dtype)
            for x in jax.tree.leaves(rngs)
        ]
        self.uses_rng = any(kind == "key" for kind, _, _ in self.rng_leaves)
        self._specs = {
            tuple(str(k) for k in path): nnx.spmd.get_var_pspec(var)
            for state in (params, rest)
            for path, var in state.flat_state()
            if var.get_metadata().get("out_sharding")
        }
        # Held until build, then handed to the Keras variables (never copied, never kept).
        self._arrays: tuple[list, list] | None = (jax.tree.leaves(params), jax.tree.leaves(rest))
        self._abstract = (
            self.params_layout.to_pure(
                [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._arrays[0]]
            ),
            self.state_layout.to_pure(
                [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._arrays[1]]
            ),
        )

    # ----------------------------------------------------------------------------- engine

    def plan(self, inputs):
        return Plan(
            trees=self._abstract,
            needs_rng=(self.uses_rng, self.uses_rng),
            partition_specs=self._specs,
        )

    def init(self, rng, inputs):
        if self._arrays is None or self._module is None:
            raise RuntimeError(f"{self.owner}: the module's arrays were already handed over.")
        params, rest = self._arrays
        _mark_moved(self._module, self.owner)
        self._arrays = self._module = None
        return self.params_layout.to_pure(params), self.state_layout.to_pure(rest)

    def given(self, initial, plan, inputs):
        if not isinstance(initial, nnx.State):
            raise TypeError(
                f"{self.owner}: for an NNX module, `variables` must be an nnx.State (e.g. "
                f"nnx.state(module)); got {type(initial).__name__}."
            )
        self._arrays = self._module = None
        flat = _flat_values(initial)
        params = self._pick(flat, self.params_layout)
        state = self._pick(flat, self.state_layout)
        expected = plan.trees
        problems = shape_mismatches(expected[0], params) + shape_mismatches(expected[1], state)
        raise_mismatches(
            self.owner,
            "variables",
            problems,
            "Pass nnx.state(module) of a module built like this one, or leave variables=None "
            "to use the module's own values.",
        )
        return params, state

    def _pick(self, flat: dict, layout: _StateLayout) -> dict:
        pure: dict = {}
        for path in layout.paths:
            if path in flat:
                node = pure
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = flat[path]
        return pure

    def fresh_rngs(self, rng) -> nnx.State:
        leaves = []
        base = jax.random.wrap_key_data(rng) if rng is not None else jax.random.key(0)
        for i, (kind, shape, info) in enumerate(self.rng_leaves):
            if kind == "count":
                leaves.append(jnp.zeros(shape, info))
                continue
            key = jax.random.fold_in(base, i)
            if info != _DEFAULT_IMPL:
                data_shape = jax.random.key_data(jax.random.key(0, impl=info)).shape
                key = jax.random.wrap_key_data(
                    jax.random.bits(key, data_shape, jnp.uint32), impl=info
                )
            if shape:
                key = jax.random.split(key, shape)
            leaves.append(key)
        return jax.tree.unflatten(self.rngs_layout.treedef, leaves)

    def module_from(self, params: dict, state: dict, rng) -> nnx.Module:
        return nnx.merge(
            self.graphdef,
            self.params_layout.from_pure(params),
            self.fresh_rngs(rng),
            self.state_layout.from_pure(state),
        )

    def apply(self, params, state, rng, inputs, training):
        module = self.module_from(params, state, rng)
        # NNX's own convention (Dropout, BatchNorm) follows the module's mode; a method that
        # takes a flag gets it too.
        module.train() if training else module.eval()
        args, kwargs = self.method.arguments(inputs, training)
        outputs = self.method.fn(module, *args, **kwargs)
        flat = _flat_values(_split_state(module)[3])
        # Variables a call adds (sown intermediates) are not state: keep the known paths only.
        new_state = self._pick(flat, self.state_layout)
        return outputs, new_state, jnp.zeros((), jnp.float32)

    def model_name(self) -> str:
        return f"NNX module {self.module_class.__name__}"

    def summary(self) -> str:
        shapes = [
            f"{'.'.join(str(p) for p in path)}: {tuple(leaf.shape)}"
            for layout, tree in zip(
                (self.params_layout, self.state_layout), self._abstract, strict=True
            )
            for path, leaf in zip(layout.paths, _leaves_at(tree, layout.paths), strict=True)
        ]
        more = f", ... ({len(shapes) - 20} more)" if len(shapes) > 20 else ""
        return f"{self.model_name()} with variables " + ", ".join(shapes[:20]) + more

    def module_object(self, values) -> nnx.Module | None:
        if values is None:
            return self._module
        params, state = values
        return self.module_from(params, state, None)

    def export(self, params: dict, state: dict) -> nnx.State:
        return nnx.merge_state(
            self.params_layout.from_pure(params), self.state_layout.from_pure(state)
        )
