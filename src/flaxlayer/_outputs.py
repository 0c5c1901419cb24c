"""What a layer's call returns to Keras: the module's outputs as structures every backend's
Keras accepts.

A dataclass output (a `flax.struct` dataclass such as Hugging Face's `ModelOutput`) becomes a
dict of its non-None fields; other mappings become dicts; lists, tuples and named tuples keep
their kind; every level is converted. Arrays are returned as they are.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any


def plain_outputs(tree: Any) -> Any:
    """`tree` with dataclasses as dicts of their non-None fields and mappings as dicts."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = ((f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree))
        return {name: plain_outputs(value) for name, value in fields if value is not None}
    if isinstance(tree, Mapping):
        return {key: plain_outputs(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [plain_outputs(value) for value in tree]
    if isinstance(tree, tuple):
        values = [plain_outputs(value) for value in tree]
        return type(tree)(*values) if hasattr(tree, "_fields") else tuple(values)
    return tree
