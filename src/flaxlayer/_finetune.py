"""Fine-tuning a built layer by Flax path: freeze, LoRA adapters and int8 kernels.

Free functions over a layer's variables (`LayerVariables`) that change which variables it
stores and trains; what the module then sees is computed by the transforms of `_transforms`,
inside the layer's compiled call. The module's code never changes. The layer's public methods
(`JaxLayer.freeze`, `enable_lora`, ...) call these, then compile a new program.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras
import numpy as np

from flaxlayer._bridges import jax_copy
from flaxlayer._distribution import derived_layout
from flaxlayer._store import Extra, LayerVariables, VariableFactory, struct_of
from flaxlayer._transforms import Int8, LoRA, Transform, quantize_int8, select
from flaxlayer._variables import is_float_dtype

#: `first_value(position)`: the initializer of a deferred variable at `position` in the
#: weights file (a layer loaded from a file); None for a layer with values.
FirstValue = Callable[[int], Callable] | None


def require_paths(owner: str, patterns: Any, what: str) -> None:
    if patterns is None:
        raise TypeError(
            f"{owner}: {what} needs `paths`, a regex or a list of them over the paths of "
            f'layer.describe(), e.g. layer.{what}(r"params/backbone/.*").'
        )


def set_trainable(
    store: LayerVariables, owner: str, patterns: Any, trainable: bool, what: str
) -> None:
    """`freeze` / `unfreeze`: the params matching `patterns` become (non-)trainable."""
    paths = store.param_paths()
    for path in select_paths(store, owner, patterns, paths, what):
        variable = store.param_vars[paths.index(path)]
        if trainable and not is_float_dtype(variable.dtype):
            raise ValueError(
                f"{owner}: cannot unfreeze {path!r}: it is stored as {variable.dtype} (an "
                "int8-quantized kernel is never trained). Enable LoRA on it instead: "
                "layer.enable_lora(rank, paths=[...])."
            )
        variable.trainable = trainable


def check_lora_arguments(owner: str, rank: Any, alpha: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{owner}: `rank` must be a positive int; got {rank!r}.")
    if alpha is not None and not (
        isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
    ):
        raise ValueError(f"{owner}: `alpha` must be a finite number; got {alpha!r}.")


def enable_lora(
    store: LayerVariables,
    factory: VariableFactory,
    rank: int,
    paths: Any,
    alpha: float | None,
    initializers: tuple[Any, Any],
) -> None:
    """Adds LoRA adapters `a`, `b` to the selected kernels, which are frozen."""
    owner = factory.owner
    check_lora_arguments(owner, rank, alpha)
    all_paths = store.param_paths()
    chosen = select_paths(store, owner, paths, all_paths, "enable_lora", min_side=rank)
    indices = [kernel_index(store, owner, all_paths, p, "enable_lora", rank) for p in chosen]
    for path, index in zip(chosen, indices, strict=True):
        if store.on(index, LoRA) is not None:
            raise ValueError(
                f"{owner}: LoRA is already enabled on {path!r} (enable_lora can be called "
                "once per kernel). Call layer.merge_lora() first to start new adapters."
            )
    transform = LoRA(rank, float(rank if alpha is None else alpha))
    inits = [keras.initializers.get(i) for i in initializers]
    for index in indices:
        base = store.param_vars[index]
        structs = transform.extra_structs(struct_of(base))
        add_extra(store, factory, index, transform, inits, structs, None)
        store.extras[-1].base_trainable = bool(base.trainable)
        base.trainable = False


def merge_lora(store: LayerVariables, factory: VariableFactory) -> None:
    """Folds every LoRA update into its kernel and removes the adapters."""
    extras = [e for e in store.extras if isinstance(e.transform, LoRA)]
    if not extras:
        raise ValueError(f"{factory.owner}: merge_lora: LoRA is not enabled.")
    for extra in extras:
        _fold(store, factory, extra)


def _fold(store: LayerVariables, factory: VariableFactory, extra: Extra) -> None:
    """Writes `extra`'s LoRA update into its stored kernel and drops the adapters."""
    base = store.param_vars[extra.index]
    value = jax_copy(base.value)
    for e in [e for e in store.extras if e.index == extra.index]:
        value = e.transform.apply(value, [jax_copy(v.value) for v in e.variables])
        if e is extra:
            break
    int8 = store.on(extra.index, Int8)
    if int8 is None:
        base.assign(np.asarray(value))
    else:
        q, scale = quantize_int8(value)
        base.assign(np.asarray(q))
        int8.variables[0].assign(np.asarray(scale))
    base.trainable = extra.base_trainable
    store.extras.remove(extra)
    factory.drop(extra.variables)


def check_quantize_mode(owner: str, mode: str | None, config: Any) -> None:
    mode = getattr(config, "mode", None) if mode is None else mode
    if mode != "int8" or getattr(config, "mode", "int8") != "int8":
        raise NotImplementedError(
            f"{owner}: quantize supports mode 'int8' (weight-only, per output channel); "
            f"got mode={mode!r}" + ("" if config is None else f" and config {config!r}")
        )


def quantize(store: LayerVariables, factory: VariableFactory, paths: Any) -> None:
    """Stores the selected kernels as int8 with a float scale per output channel."""
    owner = factory.owner
    all_paths = store.param_paths()
    chosen = select_paths(store, owner, paths, all_paths, "quantize")
    indices = [kernel_index(store, owner, all_paths, p, "quantize") for p in chosen]
    for path, index in zip(chosen, indices, strict=True):
        if store.on(index, Int8) is not None:
            raise ValueError(f"{owner}: {path!r} is already quantized to int8.")
    for index in indices:
        for extra in [e for e in store.extras if e.index == index]:
            _fold(store, factory, extra)  # only LoRA can be there: int8 was refused above
        base = store.param_vars[index]
        q, scale = quantize_int8(jax_copy(base.value))
        transform = Int8(keras.backend.standardize_dtype(base.dtype))
        scales = np.asarray(scale, transform.dtype)
        replace_param(store, factory, index, q, None)
        add_extra(store, factory, index, transform, [scales], [struct_of(scales)], None)


def select_paths(
    store: LayerVariables, owner: str, patterns: Any, paths: list[str], what: str, min_side=1
) -> list[str]:
    """The paths `patterns` select; by default the kernels: float params of rank >= 2
    whose path ends in `kernel`, with both sides (as 2-D) at least `min_side`."""
    default = [
        p
        for p, v in zip(paths, store.param_vars, strict=True)
        if p.rsplit("/", 1)[-1] == "kernel"
        and len(v.shape) >= 2
        and min(sides(v.shape)) >= min_side
    ]
    try:
        chosen = select(patterns, paths, default=default)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{owner}: {what}(`paths`): {e}") from None
    if not chosen:
        raise ValueError(
            f"{owner}: {what}: no param is a kernel it can take (a path ending in `kernel`, of "
            f"rank >= 2, with both sides at least {min_side}), so there is no default "
            f"selection; pass paths=[...] (regexes over the paths of layer.describe(): "
            f"{', '.join(paths[:8])})."
        )
    return chosen


def kernel_index(
    store: LayerVariables, owner: str, paths: list[str], path: str, what: str, rank=None
) -> int:
    """The module param at `path` (one of `paths`): a float array of rank >= 2."""
    index = paths.index(path)
    shape = tuple(store.param_vars[index].shape)
    seen = store.module_dtype(index)
    if len(shape) < 2 or not is_float_dtype(seen):
        raise ValueError(
            f"{owner}: {what}: {path!r} has shape {shape} and dtype {seen}; only float "
            "kernels of rank >= 2 can be selected. Narrow `paths` to kernels."
        )
    if rank is not None and rank > min(sides(shape)):
        raise ValueError(
            f"{owner}: {what}: rank {rank} is larger than the smaller side of {path!r} (shape "
            f"{shape} as {sides(shape)}); a LoRA rank is at most that."
        )
    return index


def add_extra(
    store: LayerVariables,
    factory: VariableFactory,
    index: int,
    transform: Transform,
    initial: Sequence[Any],
    structs: Sequence[jax.ShapeDtypeStruct],
    first_value: FirstValue,
) -> None:
    """Adds `transform` on module param `index` with variables for its extras, from
    `initial` (arrays or initializers), or deferred with `first_value`."""
    base_parts = store.variable_parts(index)
    first = len(store.all_vars)  # where each will be in the weights file
    variables = [
        factory.create(
            (transform.kind, *base_parts, name),
            tuple(struct.shape),
            struct.dtype,
            value if first_value is None else first_value(first + i),
            param=True,
            trainable=transform.trainable,
            layout=derived_layout(store.layout(index), transform.kind, name, struct.shape),
            deferred=first_value is not None,
        )
        for i, (name, struct, value) in enumerate(
            zip(transform.extras, structs, initial, strict=True)
        )
    ]
    store.extras.append(Extra(index, transform, variables))


def replace_param(
    store: LayerVariables, factory: VariableFactory, index: int, value: Any, first_value: FirstValue
) -> None:
    """Stores module param `index` in a new non-trainable variable holding `value` (an array,
    or an abstract one with `first_value`)."""
    old = store.param_vars[index]
    store.param_vars[index] = factory.create(
        store.variable_parts(index),
        tuple(value.shape),
        value.dtype,
        np.asarray(value) if first_value is None else first_value(index),
        param=True,
        trainable=False,
        layout=store.layout(index),
        deferred=first_value is not None,
    )
    factory.drop([old])


def stored_from_module(store: LayerVariables, params: list) -> list:
    """For a loaded layer used before any weights came: the transforms' stored values from
    the module's initial `params` (quantized in place), as enabling them would make."""
    values: list = []
    for extra in store.extras:
        if isinstance(extra.transform, Int8):
            q, scale = quantize_int8(params[extra.index])
            params[extra.index] = np.asarray(q)
            values.append(np.asarray(scale, extra.transform.dtype))
        else:
            a, b = (tuple(v.shape) for v in extra.variables)
            a_value = keras.ops.convert_to_numpy(keras.initializers.HeUniform()(a))
            values += [a_value, np.zeros(b, np.float32)]
    return values


def sides(shape: Sequence[int]) -> tuple[int, int]:
    """A kernel's shape as 2-D: (prod(all but last), last)."""
    return (math.prod(shape[:-1]), shape[-1])
