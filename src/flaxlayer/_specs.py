"""Input specs: the shapes and dtypes a layer is built for, abstract inputs made from them, and
their JSON form in a layer's build config."""

from typing import Any

import jax
import keras
import numpy as np

from flaxlayer._saving import SerializationError
from flaxlayer._trust import Refused, dtype_from_name
from flaxlayer._variables import is_float_dtype

MAX_SPEC_DEPTH = 100
#: A recorded dimension is below this (the int32 index range every backend addresses).
MAX_DIMENSION = 2**31


# Unknown dimensions are probed at two sizes to tell which output dimensions follow them.
PROBE_SIZES = (8, 12)


class Leaf:
    """Shape (with None for unknown dimensions) and dtype of one input leaf."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def struct(self, fill: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(fill if d is None else d for d in self.shape), self.dtype)


def leaf_dtype(dtype: Any, float_dtype: str) -> Any:
    dtype = keras.backend.standardize_dtype(dtype) if dtype is not None else float_dtype
    return float_dtype if is_float_dtype(dtype) else dtype


def spec_of(inputs: Any, float_dtype: str) -> Any:
    def leaf(x):
        if x is None:  # an argument passed as None in a dict of inputs (`head_mask`)
            return None
        return Leaf(
            tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape),
            leaf_dtype(getattr(x, "dtype", None), float_dtype),
        )

    return keras.tree.map_structure(leaf, inputs)


def check_recorded(recorded: Any, given: Any, owner: str) -> None:
    """The inputs a model gives a layer from a file fit the input spec its build config
    records: the same structure, and per leaf the same dtype, rank and known dimensions."""
    is_leaf = lambda x: isinstance(x, Leaf)  # noqa: E731
    ours_def: Any
    ours, ours_def = jax.tree.flatten(recorded, is_leaf=is_leaf)
    theirs, theirs_def = jax.tree.flatten(given, is_leaf=is_leaf)
    fits = ours_def == theirs_def and all(
        str(a.dtype) == str(b.dtype)
        and len(a.shape) == len(b.shape)
        and all(x is None or y is None or x == y for x, y in zip(a.shape, b.shape, strict=True))
        for a, b in zip(ours, theirs, strict=True)
    )
    if not fits:
        shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t, is_leaf=is_leaf)  # noqa: E731
        raise SerializationError(
            f"{owner}: cannot load build_config.input_spec: it records inputs (shape, dtype) "
            f"{str(shapes(recorded))[:200]}, but the model gives the layer "
            f"{str(shapes(given))[:200]}. The file was tampered with or damaged."
        )


def is_shape(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(d is None or isinstance(d, int) for d in x)


def spec_from_shapes(shapes: Any, float_dtype: str) -> Any:
    if is_shape(shapes):
        return Leaf(shapes, float_dtype)
    if isinstance(shapes, dict):
        return {k: spec_from_shapes(v, float_dtype) for k, v in shapes.items()}
    if isinstance(shapes, (tuple, list)):
        return type(shapes)(spec_from_shapes(v, float_dtype) for v in shapes)
    raise ValueError(f"Cannot read an input shape from {shapes!r}.")


def structs(spec: Any, fill: int) -> Any:
    return jax.tree.map(lambda leaf: leaf.struct(fill), spec, is_leaf=lambda x: isinstance(x, Leaf))


def has_unknown(spec: Any) -> bool:
    leaves = jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, Leaf))
    return any(d is None for leaf in leaves for d in leaf.shape)


def merge_probes(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> keras.KerasTensor:
    shape = tuple(x if x == y else None for x, y in zip(a.shape, b.shape, strict=True))
    return keras.KerasTensor(shape, dtype=keras.backend.standardize_dtype(a.dtype))


def dtype_name(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def spec_to_config(spec: Any, owner: str, what: str) -> Any:
    """A tree of `Leaf`s (and static strings) as JSON."""
    if isinstance(spec, Leaf):
        return {"shape": list(spec.shape), "dtype": keras.backend.standardize_dtype(spec.dtype)}
    if isinstance(spec, dict):
        return {"dict": [[k, spec_to_config(v, owner, what)] for k, v in spec.items()]}
    if isinstance(spec, (list, tuple)) and not hasattr(spec, "_fields"):
        kind = "list" if isinstance(spec, list) else "tuple"
        return {kind: [spec_to_config(v, owner, what) for v in spec]}
    if spec is None:
        return {"none": None}
    if isinstance(spec, str):
        return {"static": spec}
    raise SerializationError(
        f"{owner}: cannot record the {what} structure: it holds a {type(spec).__qualname__}. "
        "Only dicts, lists, tuples, arrays and strings can be saved; give the layer an "
        "init_fn that creates the values instead."
    )


def spec_from_config(data: Any, owner: str, path: tuple, *, abstract: bool = False) -> Any:
    """The tree `spec_to_config` wrote; every entry checked (shapes, dtypes, depth)."""
    return _SpecReader(owner, abstract).read(data, path)


class _SpecReader:
    """Reads one recorded input structure for `spec_from_config`; `owner` names the layer in
    errors, and with `abstract` every dimension must be known."""

    def __init__(self, owner: str, abstract: bool):
        self.owner, self.abstract = owner, abstract

    def fail(self, where: tuple, what: str) -> SerializationError:
        shown = ".".join(str(p) for p in where)
        return SerializationError(f"{self.owner}: cannot load config entry {shown}: {what}")

    def read(self, node: Any, where: tuple) -> Any:
        if len(where) > 2 * MAX_SPEC_DEPTH:
            raise self.fail(where, f"it is nested deeper than {MAX_SPEC_DEPTH} levels.")
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise self.fail(where, f"{node!r} is not an entry of a recorded structure.")
        if set(node) == {"shape", "dtype"}:
            return self.leaf(node, where)
        (kind,) = node if len(node) == 1 else (None,)
        value = node.get(kind)
        if kind == "none" and value is None:
            return None
        if kind == "static" and isinstance(value, str):
            return value
        if kind in ("list", "tuple") and isinstance(value, list):
            items = [self.read(v, (*where, kind, i)) for i, v in enumerate(value)]
            return items if kind == "list" else tuple(items)
        if kind == "dict" and isinstance(value, list):
            return self.mapping(value, where)
        raise self.fail(where, f"{node!r} is not an entry of a recorded structure.")

    def leaf(self, node: dict, where: tuple) -> Leaf:
        shape = node["shape"]
        if not (isinstance(shape, list) and len(shape) <= 32 and all(map(self.is_size, shape))):
            raise self.fail(
                (*where, "shape"),
                f"{str(shape)[:200]} is not a shape (a list of at most 32 dimensions, each "
                f"{'' if self.abstract else 'null or '}an integer in [0, 2**31)).",
            )
        try:
            dtype = dtype_from_name(node["dtype"])
        except Refused as e:
            raise self.fail((*where, "dtype"), str(e)) from None
        return Leaf(shape, dtype.name)

    def is_size(self, d: Any) -> bool:
        """A recorded dimension: a size, or None (unknown) unless abstract."""
        return (d is None and not self.abstract) or (
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIMENSION
        )

    def mapping(self, items: list, where: tuple) -> dict:
        out = {}
        for i, item in enumerate(items):
            pair = isinstance(item, list) and len(item) == 2
            if not (pair and isinstance(item[0], (str, int))):
                raise self.fail((*where, "dict", i), "not a [key, value] pair.")
            out[item[0]] = self.read(item[1], (*where, "dict", item[0]))
        return out
