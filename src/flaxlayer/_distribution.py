"""Flax partitioning annotations and `keras.distribution` -> one layout per variable.

For each variable: the LayoutMap entry matching its path if any; otherwise, under ModelParallel,
its Flax annotation (`nn.with_partitioning`, `nn.LogicallyPartitioned` mapped by
`nn.logical_axis_rules`, NNX `out_sharding` metadata); otherwise what the distribution gives
(replicated).
"""

import types
from collections.abc import Sequence
from typing import Any

import keras
from keras.distribution import ModelParallel, TensorLayout

from flaxlayer._bridges import supports_distribution
from flaxlayer._compat import current_path, distribution_layout_map


def active_distribution() -> Any:
    if not supports_distribution():
        return None
    return keras.distribution.distribution()


def current_scope_path() -> str:
    return current_path()


def variable_layouts(
    distribution: Any,
    paths: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    annotations: dict[str, Any],
    *,
    owner: str,
) -> list[TensorLayout]:
    """The layout of each variable (full paths), honouring `annotations` ({path: spec})."""
    layout_map = distribution_layout_map(distribution)
    mesh = distribution.device_mesh
    layouts = []
    for path, shape in zip(paths, shapes, strict=True):
        layout = layout_map[path] if layout_map is not None else None
        spec = annotations.get(path)
        if layout is None and spec is not None and isinstance(distribution, ModelParallel):
            layout = _layout_from_spec(spec, shape, mesh, path, owner)
        if layout is None:
            layout = distribution.get_variable_layout(types.SimpleNamespace(path=path, shape=shape))
        if layout.device_mesh is None:
            layout.device_mesh = mesh
        layouts.append(layout)
    return layouts


def _layout_from_spec(spec: Any, shape, mesh, path: str, owner: str) -> TensorLayout:
    axes = list(spec) + [None] * (len(shape) - len(spec))
    named = [a for axis in axes for a in (axis if isinstance(axis, tuple) else (axis,)) if a]
    unknown = [a for a in named if a not in mesh.axis_names]
    if unknown or len(axes) != len(shape):
        raise ValueError(
            f"{owner}: the Flax annotation of {path!r} is {tuple(spec)}, but the device mesh's "
            f"axes are {tuple(mesh.axis_names)} (and the variable has shape {tuple(shape)}). "
            "Map logical axis names to mesh axes with `with nn.logical_axis_rules(...)` around "
            "building the model, or give the path a LayoutMap entry."
        )
    return TensorLayout(axes, mesh)


def backend_sharding(layout: TensorLayout) -> Any:
    return layout.backend_layout


def derived_layout(
    base: TensorLayout | None, kind: str, name: str, shape: Sequence[int]
) -> TensorLayout | None:
    """The layout of a transform's variable, from its kernel's: LoRA's `a` keeps the input
    axis's sharding (of a 2-D kernel) and `b` the output axis's, with the low-rank axis
    replicated; int8's scale follows the output axis."""
    if base is None:
        return None
    axes = tuple(base.axes)
    if kind == "lora":
        axes = (axes[0] if len(axes) == 2 else None, None) if name == "a" else (None, axes[-1])
    elif name == "scale":
        axes = (axes[-1],)
    if len(axes) != len(shape):
        axes = (None,) * len(shape)
    return TensorLayout(axes, base.device_mesh)
