"""`layer.describe()`: the variable tree inside one flaxlayer layer, as a table.

`model.summary()` shows a FlaxLayer as one row. This module lists what is inside it, one row per
variable, as Flax users see it with `nn.tabulate`: the Flax path (`params/Dense_0/kernel`, the
NNX attribute path `linear1/kernel`, or for a JaxLayer the pytree path `params/w`), the shape,
the dtype, whether Keras trains it, and its element count; then the totals.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import keras

from flaxlayer._variables import format_path

_HEADERS = ("path", "shape", "dtype", "trainable", "count")
_RIGHT_ALIGNED = {"count"}


@dataclasses.dataclass(frozen=True)
class VariableGroup:
    """Variables of one tree (params or state), with their paths inside it."""

    prefix: tuple[str, ...]
    paths: Sequence[tuple[str, ...]]
    variables: Sequence[Any]


def table_lines(title: str, groups: Sequence[VariableGroup], trainable_ids: set[int]) -> list[str]:
    """The lines `JaxLayer.describe` prints: a title, one row per variable, the totals."""
    rows: list[tuple[str, ...]] = []
    totals = {True: [0, 0], False: [0, 0]}  # trainable -> [count, bytes]
    for group in groups:
        for parts, variable in zip(group.paths, group.variables, strict=True):
            shape = tuple(int(d) for d in variable.shape)
            dtype = keras.backend.standardize_dtype(variable.dtype)
            count = math.prod(shape)
            trainable = id(variable) in trainable_ids
            totals[trainable][0] += count
            totals[trainable][1] += count * jnp.dtype(dtype).itemsize
            path = group.prefix + parts if parts else (*group.prefix, "value")
            rows.append(
                (format_path(path), str(shape), dtype, "yes" if trainable else "no", f"{count:,}")
            )

    lines = [title]
    if rows:
        lines += _format_table(rows)
    else:
        lines.append("(no variables)")
    count = totals[True][0] + totals[False][0]
    size = totals[True][1] + totals[False][1]
    lines.append(
        f"Total: {count:,} params ({_readable(size)}); "
        f"trainable: {totals[True][0]:,} ({_readable(totals[True][1])}); "
        f"non-trainable: {totals[False][0]:,} ({_readable(totals[False][1])})"
    )
    return lines


def _format_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADERS)]

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.rjust(w) if h in _RIGHT_ALIGNED else cell.ljust(w)
            for cell, w, h in zip(cells, widths, _HEADERS, strict=True)
        ]
        return "  ".join(out).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return [line(_HEADERS), rule, *(line(r) for r in rows), rule]


def _readable(n_bytes: float) -> str:
    """Keras's `model.summary()` format: 1024-based, two decimals."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1024:
            return f"{n_bytes:.2f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.2f} PB"
