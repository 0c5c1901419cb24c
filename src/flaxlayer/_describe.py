"""`layer.describe()`: the variable tree inside one flaxlayer layer, as a table.

`model.summary()` shows a FlaxLayer as one row. This module lists what is inside it, one row per
variable, as Flax users see it with `nn.tabulate`: the Flax path (`params/Dense_0/kernel`, the
NNX attribute path `linear1/kernel`, or for a JaxLayer the pytree path `params/w`), the shape,
the dtype, whether Keras trains it, and its element count; then the totals.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import keras

from flaxlayer._variables import format_path

_HEADERS = ("path", "shape", "dtype", "trainable", "count")
_RIGHT_ALIGNED = {"count"}


def describe_layer(layer: Any, print_fn: Callable[[str], Any] | None = None) -> None:
    """Prints the table for a built `JaxLayer`/`FlaxLayer`; see `JaxLayer.describe`."""
    if not layer.built:
        raise ValueError(
            f"{layer._owner_name()} is not built yet, so it has no variables to describe. "
            "Build it first: call it once on inputs (`layer(x)`), call "
            "`layer.build(input_shape)` (e.g. `layer.build((None, 8, 8, 1))`), or build or "
            "call the model that holds it."
        )
    print_fn = print if print_fn is None else print_fn
    for line in table_lines(layer):
        print_fn(line)


def table_lines(layer: Any) -> list[str]:
    """The lines `describe` prints, for a built layer."""
    core = layer._core
    adapter = core.adapter
    trainable_ids = {id(v) for v in layer.trainable_weights}
    rows = []
    totals = {True: [0, 0], False: [0, 0]}  # trainable -> [count, bytes]
    groups = (
        (core.params_layout, core.param_vars, adapter.params_prefix),
        (core.state_layout, core.state_vars, adapter.state_prefix),
    )
    for layout, variables, prefix in groups:
        for parts, variable in zip(layout.paths, variables, strict=True):
            shape = tuple(int(d) for d in variable.shape)
            dtype = keras.backend.standardize_dtype(variable.dtype)
            count = math.prod(shape)
            trainable = id(variable) in trainable_ids
            totals[trainable][0] += count
            totals[trainable][1] += count * jnp.dtype(dtype).itemsize
            rows.append(
                (
                    format_path(prefix + parts if parts else (*prefix, "value")),
                    str(shape),
                    dtype,
                    "yes" if trainable else "no",
                    f"{count:,}",
                )
            )

    lines = [_title(layer)]
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


def _title(layer: Any) -> str:
    what = layer._core.adapter.model_name()
    return layer._owner_name() + (f" ({what})" if what else "")


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
