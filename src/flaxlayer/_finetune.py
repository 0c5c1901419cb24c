"""Fine-tuning a built layer by Flax path: freeze, LoRA adapters and int8 kernels.

`FineTuning` is the part of `JaxLayer` that changes which variables a layer stores and trains;
what the module then sees is computed by the transforms of `_transforms`, inside the layer's
compiled call. The module's code never changes.
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from flaxlayer import _compat
from flaxlayer._bridges import jax_copy
from flaxlayer._distribution import derived_layout
from flaxlayer._saving import SerializationError
from flaxlayer._transforms import (
    TRANSFORMS,
    Applied,
    Int8,
    LoRA,
    Transform,
    quantize_int8,
    select,
)
from flaxlayer._variables import format_path, is_float_dtype


@dataclasses.dataclass
class Extra:
    """A transform on module param `index` and the Keras variables holding its extras."""

    index: int
    transform: Transform
    variables: list
    #: For LoRA: whether the base kernel was trainable before (restored by `merge_lora`).
    base_trainable: bool = True


def applied(extras: Sequence[Extra], count: int) -> tuple[Applied, ...]:
    """The transforms with the stored indices of their extras (after the `count` module's)."""
    out, offset = [], count
    for extra in extras:
        n = len(extra.variables)
        out.append(Applied(extra.index, extra.transform, tuple(range(offset, offset + n))))
        offset += n
    return tuple(out)


class FineTuning:
    """Freeze, LoRA and int8 by Flax path (mixed into `JaxLayer`)."""

    # Provided by JaxLayer.
    _core: Any
    built: bool
    name: str
    _owner_name: Callable[[], str]
    _compile_program: Callable[[], None]

    # ------------------------------------------------------------------------------ freezing

    def freeze(self, paths: str | Sequence[str]) -> None:
        """Makes the params matching `paths` non-trainable (their values never change in `fit`).

        Args:
            paths: A regex, or a list of them, each matching whole Flax paths as
                `layer.describe()` shows them (`r"params/backbone/.*"`; for NNX
                `r"encoder/.*"`).

        Raises:
            ValueError: if the layer is not built, or a pattern matches no param.

        Call `model.compile(...)` after it, as after setting `trainable` on a Keras layer.

        Example:

        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(3))
        >>> layer.build((None, 4))
        >>> layer.freeze(r"params/kernel")
        >>> [w.path for w in layer.trainable_weights]
        ['flax_layer/params/bias']
        """
        self._set_trainable(paths, False, "freeze")

    def unfreeze(self, paths: str | Sequence[str]) -> None:
        """Makes the float params matching `paths` trainable again (see `freeze`).

        Example:

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(3))
        >>> layer.build((None, 4))
        >>> layer.freeze(r"params/.*")
        >>> layer.unfreeze(r"params/bias")
        >>> [w.path for w in layer.trainable_weights]
        ['flax_layer/params/bias']
        """
        self._set_trainable(paths, True, "unfreeze")

    def _set_trainable(self, patterns: Any, trainable: bool, what: str) -> None:
        if patterns is None:
            raise TypeError(
                f"{self._owner_name()}: {what} needs `paths`, a regex or a list of them over "
                f'the paths of layer.describe(), e.g. layer.{what}(r"params/backbone/.*").'
            )
        self._check_built_for(what)
        paths = self._param_paths()
        chosen = self._select(patterns, paths, what, "paths")
        variables = self._core.param_vars
        for path in chosen:
            variable = variables[paths.index(path)]
            if trainable and not is_float_dtype(variable.dtype):
                raise ValueError(
                    f"{self._owner_name()}: cannot unfreeze {path!r}: it is stored as "
                    f"{variable.dtype} (an int8-quantized kernel is never trained). Enable "
                    "LoRA on it instead: layer.enable_lora(rank, paths=[...])."
                )
            variable.trainable = trainable

    # ---------------------------------------------------------------------------------- LoRA

    def enable_lora(
        self,
        rank: int,
        paths: str | Sequence[str] | None = None,
        alpha: float | None = None,
        a_initializer: Any = "he_uniform",
        b_initializer: Any = "zeros",
    ) -> None:
        """Freezes the selected kernels and trains a low-rank update of each instead.

        For each kernel, two trainable variables `<layer>/lora/<flax path>/a` and `.../b` are
        added, and the module sees `kernel + (a @ b).reshape(kernel.shape) * alpha / rank`
        (N-D kernels, such as a Conv's `(kh, kw, in, out)`, as `(prod(all but last), last)`).
        `b` starts at zero, so outputs are unchanged until training. Named after Keras's
        `Dense.enable_lora`; call `model.compile(...)` after it.

        Args:
            rank: The rank of the update, at least 1 and at most the kernel's smaller side
                (a higher rank would train more parameters than the kernel has).
            paths: Regexes over the Flax paths of `layer.describe()`; default: every float
                param of rank >= 2 whose path ends in `kernel` and whose smaller side is at
                least `rank` (a narrower one, such as a one-output head, is left as it is and
                trains fully).
            alpha: Scale of the update (`alpha / rank`); default `rank`.
            a_initializer: Keras initializer of `a`.
            b_initializer: Keras initializer of `b`.

        Raises:
            ValueError: if the layer is not built, LoRA is already on a selected kernel, a
                selected param is not a float array of rank >= 2, or `rank` is out of range.

        Example:

        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.enable_lora(2)
        >>> [(w.path, tuple(w.shape)) for w in layer.trainable_weights]
        [('flax_layer/params/bias', (8,)), ('flax_layer/lora/params/kernel/a', (16, 2)), \
('flax_layer/lora/params/kernel/b', (2, 8))]
        """
        self._check_built_for("enable_lora")
        owner = self._owner_name()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{owner}: `rank` must be a positive int; got {rank!r}.")
        if alpha is not None and not (
            isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
        ):
            raise ValueError(f"{owner}: `alpha` must be a finite number; got {alpha!r}.")
        all_paths = self._param_paths()
        chosen = self._select(paths, all_paths, "enable_lora", "paths", min_side=rank)
        transform = LoRA(rank, float(rank if alpha is None else alpha))
        indices = [self._kernel_index(all_paths, p, "enable_lora", rank=rank) for p in chosen]
        for path, index in zip(chosen, indices, strict=True):
            if self._on(index, LoRA) is not None:
                raise ValueError(
                    f"{owner}: LoRA is already enabled on {path!r} (enable_lora can be called "
                    "once per kernel). Call layer.merge_lora() first to start new adapters."
                )
        a_init = keras.initializers.get(a_initializer)
        b_init = keras.initializers.get(b_initializer)
        for index in indices:
            base = self._core.param_vars[index]
            structs = transform.extra_structs(_struct(base))
            self._add_extra(index, transform, [a_init, b_init], structs, trainable=True)
            self._core.extras[-1].base_trainable = bool(base.trainable)
            base.trainable = False
        self._compile_program()

    def merge_lora(self) -> None:
        """Folds every LoRA update into its kernel and removes the adapters.

        The kernels get back the trainability they had before `enable_lora`; outputs are
        unchanged (up to float rounding; an int8 kernel is quantized again).

        Example:

        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.enable_lora(2)
        >>> layer.merge_lora()
        >>> len(layer.weights)
        2
        """
        self._check_built_for("merge_lora")
        extras = [e for e in self._core.extras if isinstance(e.transform, LoRA)]
        if not extras:
            raise ValueError(f"{self._owner_name()}: merge_lora: LoRA is not enabled.")
        for extra in extras:
            self._fold(extra)
        self._compile_program()

    def _fold(self, extra: Extra) -> None:
        """Writes `extra`'s LoRA update into its stored kernel and drops the adapters."""
        core = self._core
        base = core.param_vars[extra.index]
        chain = [e for e in core.extras if e.index == extra.index]
        value = jax_copy(base.value)
        for e in chain:
            value = e.transform.apply(value, [jax_copy(v.value) for v in e.variables])
            if e is extra:
                break
        int8 = self._on(extra.index, Int8)
        if int8 is None:
            base.assign(np.asarray(value))
        else:
            q, scale = quantize_int8(value)
            base.assign(np.asarray(q))
            int8.variables[0].assign(np.asarray(scale))
        base.trainable = extra.base_trainable
        self._remove_extra(extra)

    # ---------------------------------------------------------------------------------- int8

    def quantize(
        self,
        mode: str | None = None,
        type_check: bool = True,
        config: Any = None,
        paths: str | Sequence[str] | None = None,
    ) -> None:
        """Stores the selected kernels as int8 with a float32 scale per output channel.

        Keras's `model.quantize("int8")` calls this on every layer. The module sees
        `int8 * scale` in the kernel's dtype (weight-only quantization: inputs stay float); a
        kernel with LoRA is merged first. The `.keras` file holds the int8 values.

        Args:
            mode: `"int8"`, the one mode supported.
            type_check: Accepted for Keras's `model.quantize`; unused.
            config: A `keras.quantizers.Int8QuantizationConfig` (what `model.quantize("int8")`
                passes) or None; only its mode is used: kernels are quantized per output
                channel and activations stay float.
            paths: Regexes over the Flax paths of `layer.describe()`; default: every float
                param of rank >= 2 whose path ends in `kernel`.

        Raises:
            NotImplementedError: for another mode.
            ValueError: if the layer is not built or a selected kernel is already int8.

        Example:

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.quantize("int8")
        >>> [(w.path, w.dtype) for w in layer.weights]
        [('flax_layer/params/bias', 'float32'), ('flax_layer/params/kernel', 'int8'), \
('flax_layer/int8/params/kernel/scale', 'float32')]
        """
        owner = self._owner_name()
        mode = getattr(config, "mode", None) if mode is None else mode
        if mode != "int8" or getattr(config, "mode", "int8") != "int8":
            raise NotImplementedError(
                f"{owner}: quantize supports mode 'int8' (weight-only, per output channel); "
                f"got mode={mode!r}" + ("" if config is None else f" and config {config!r}")
            )
        self._check_built_for("quantize")
        all_paths = self._param_paths()
        chosen = self._select(paths, all_paths, "quantize", "paths")
        indices = [self._kernel_index(all_paths, p, "quantize") for p in chosen]
        core = self._core
        for path, index in zip(chosen, indices, strict=True):
            if self._on(index, Int8) is not None:
                raise ValueError(f"{owner}: {path!r} is already quantized to int8.")
        for index in indices:
            for extra in [e for e in core.extras if e.index == index]:
                self._fold(extra)  # only LoRA can be there: int8 was refused above
            base = core.param_vars[index]
            q, scale = quantize_int8(jax_copy(base.value))
            transform = Int8(keras.backend.standardize_dtype(base.dtype))
            scales = np.asarray(scale, transform.dtype)
            self._replace_param(index, q)
            self._add_extra(index, transform, [scales], [_struct(scales)], trainable=False)
        self._compile_program()

    # ----------------------------------------------------------------------- config replay

    def _finetune_config(self) -> dict | None:
        core = self._core
        if not core.extras and all(v.trainable for v in core.param_vars if _is_float(v)):
            return None
        paths = self._param_paths()
        lora_bases = {e.index for e in core.extras if isinstance(e.transform, LoRA)}
        return {
            "frozen": [
                paths[i]
                for i, v in enumerate(core.param_vars)
                if _is_float(v) and not v.trainable and i not in lora_bases
            ],
            "transforms": [
                {"path": paths[e.index], **e.transform.to_config()} for e in core.extras
            ],
        }

    def _replay_finetune(self, data: Any) -> None:
        """Re-applies a config's transforms and frozen paths to a layer being loaded: the
        variables are created without values, as the module's own are, for the weights file."""
        owner = self._owner_name()
        paths = self._param_paths()
        config = _check_finetune(data, owner, paths)
        core = self._core
        for entry in config["transforms"]:
            index = paths.index(entry["path"])
            kind = entry.pop("kind")
            entry.pop("path")
            transform = TRANSFORMS[kind](**entry)
            base = _struct(core.param_vars[index])
            if isinstance(transform, Int8):
                if not (base.dtype == jnp.dtype(transform.dtype) and len(base.shape) >= 2):
                    raise _config_error(owner, f"int8 on {paths[index]!r}", "a float kernel")
                self._replace_param(index, jax.ShapeDtypeStruct(base.shape, jnp.int8))
            elif not 1 <= transform.rank <= min(_sides(base.shape)):  # type: ignore[attr-defined]
                raise _config_error(owner, f"the LoRA rank on {paths[index]!r}", "in range")
            structs = transform.extra_structs(base)
            self._add_extra(index, transform, [None] * len(structs), structs, transform.trainable)
            if isinstance(transform, LoRA):
                core.extras[-1].base_trainable = True
                core.param_vars[index].trainable = False
        for path in config["frozen"]:
            core.param_vars[paths.index(path)].trainable = False

    # ------------------------------------------------------------------------------- helpers

    def _check_built_for(self, what: str) -> None:
        if not self.built:
            raise ValueError(
                f"{self._owner_name()}: {what} needs a built layer (its variables exist once it "
                "is built). Call the layer on inputs, or layer.build(input_shape), first."
            )

    def _param_paths(self) -> list[str]:
        return [format_path(self._variable_parts(i)) for i in range(len(self._core.param_vars))]

    def _select(
        self, patterns: Any, paths: list[str], what: str, argument: str, min_side: int = 1
    ) -> list[str]:
        """The paths `patterns` select; by default the kernels: float params of rank >= 2
        whose path ends in `kernel`, with both sides (as 2-D) at least `min_side`."""
        default = [
            p
            for p, v in zip(paths, self._core.param_vars, strict=True)
            if p.rsplit("/", 1)[-1] == "kernel"
            and len(v.shape) >= 2
            and min(_sides(v.shape)) >= min_side
        ]
        try:
            chosen = select(patterns, paths, default=default)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self._owner_name()}: {what}(`{argument}`): {e}") from None
        if not chosen:
            raise ValueError(
                f"{self._owner_name()}: {what}: no param is a kernel it can take (a path ending "
                f"in `kernel`, of rank >= 2, with both sides at least {min_side}), so there is "
                f"no default selection; pass {argument}=[...] (regexes over the paths of "
                f"layer.describe(): {', '.join(paths[:8])})."
            )
        return chosen

    def _on(self, index: int, kind: type[Transform]) -> Extra | None:
        """The transform of type `kind` on module param `index`, if there is one."""
        return next(
            (e for e in self._core.extras if e.index == index and isinstance(e.transform, kind)),
            None,
        )

    def _module_dtype(self, index: int) -> str:
        """The dtype module param `index` has as the module sees it (an int8 kernel's float)."""
        int8 = self._on(index, Int8)
        if int8 is not None:
            return int8.transform.dtype  # type: ignore[attr-defined]
        return keras.backend.standardize_dtype(self._core.param_vars[index].dtype)

    def _kernel_index(self, paths: list[str], path: str, what: str, rank: int | None = None) -> int:
        """The module param at `path` (one of `paths`): a float array of rank >= 2."""
        index = paths.index(path)
        variable = self._core.param_vars[index]
        seen = self._module_dtype(index)
        if len(variable.shape) < 2 or not is_float_dtype(seen):
            raise ValueError(
                f"{self._owner_name()}: {what}: {path!r} has shape {tuple(variable.shape)} and "
                f"dtype {seen}; only float kernels of rank >= 2 can be selected. Narrow "
                "`paths` to kernels."
            )
        if rank is not None and rank > min(_sides(variable.shape)):
            raise ValueError(
                f"{self._owner_name()}: {what}: rank {rank} is larger than the smaller side "
                f"of {path!r} (shape {tuple(variable.shape)} as {_sides(variable.shape)}); "
                "a LoRA rank is at most that."
            )
        return index

    def _add_extra(
        self,
        index: int,
        transform: Transform,
        initial: list,
        structs: list[jax.ShapeDtypeStruct],
        trainable: bool,
    ) -> None:
        core = self._core
        base_parts = self._variable_parts(index)
        first = len(core.all_vars)  # where a deferred variable will be in the weights file
        variables = [
            self._new_variable(
                (transform.kind, *base_parts, name),
                struct,
                value,
                trainable=trainable,
                layout=derived_layout(self._layout(index), transform.kind, name, struct.shape),
                position=first + i,
            )
            for i, (name, struct, value) in enumerate(
                zip(transform.extras, structs, initial, strict=True)
            )
        ]
        core.extras.append(Extra(index, transform, variables))

    def _extra_paths(self) -> list[tuple[str, ...]]:
        """The transforms' variables as paths under the layer (`lora/params/.../a`)."""
        return [
            (extra.transform.kind, *self._variable_parts(extra.index), name)
            for extra in self._core.extras
            for name in extra.transform.extras
        ]

    def _stored_from_module(self, params: list) -> list:
        """For a loaded layer used before any weights came: the transforms' stored values from
        the module's initial `params` (quantized in place), as enabling them would make."""
        values: list = []
        for extra in self._core.extras:
            if isinstance(extra.transform, Int8):
                q, scale = quantize_int8(params[extra.index])
                params[extra.index] = np.asarray(q)
                values.append(np.asarray(scale, extra.transform.dtype))
            else:
                a, b = (tuple(v.shape) for v in extra.variables)
                values += [
                    keras.ops.convert_to_numpy(keras.initializers.HeUniform()(a)),
                    np.zeros(b, np.float32),
                ]
        return values

    def _remove_extra(self, extra: Extra) -> None:
        core = self._core
        core.extras.remove(extra)
        with _compat.unlocked_tracker(self):
            for variable in extra.variables:
                _compat.untrack_variable(self, variable)

    def _replace_param(self, index: int, value: Any) -> None:
        """Stores module param `index` in a new (non-trainable) variable holding `value`."""
        core = self._core
        old = core.param_vars[index]
        new = self._new_variable(
            self._variable_parts(index),
            jax.ShapeDtypeStruct(tuple(value.shape), value.dtype),
            None if isinstance(value, jax.ShapeDtypeStruct) else value,
            trainable=False,
            layout=self._layout(index),
            position=index,
        )
        with _compat.unlocked_tracker(self):
            _compat.untrack_variable(self, old)
        core.param_vars[index] = new

    def _variable_parts(self, index: int) -> tuple[str, ...]:
        core = self._core
        return core.adapter.params_prefix + (core.params_layout.paths[index] or ("value",))

    def _layout(self, index: int) -> Any:
        layouts = self._core.build_args[2] if self._core.build_args else None
        return layouts.get(self._variable_parts(index)) if layouts else None

    def _new_variable(
        self,
        parts: tuple[str, ...],
        struct: jax.ShapeDtypeStruct,
        value: Any,
        *,
        trainable: bool,
        layout: Any,
        position: int,
    ) -> keras.Variable:
        """A variable of this layer at `<layer>/<parts>`; without a value (`None`) while the
        layer is loading (deferred, filled from the weights file, where it is at `position`)."""
        deferred = value is None
        floating = is_float_dtype(struct.dtype)
        if deferred:
            initializer: Any = self._first_value(position)  # type: ignore[attr-defined]
        elif callable(value):
            initializer = value
        else:
            initializer = np.asarray(value)
        scope = contextlib.ExitStack()
        with scope:
            if deferred:
                scope.enter_context(keras.StatelessScope(initialize_variables=False))
            scope.enter_context(keras.name_scope(self.name, caller=self))
            for part in parts[:-1]:
                scope.enter_context(keras.name_scope(part))
            with _compat.unlocked_tracker(self):
                variable = keras.Variable(
                    initializer=initializer,
                    shape=tuple(struct.shape),
                    name=parts[-1],
                    dtype=keras.backend.standardize_dtype(struct.dtype),
                    trainable=trainable and floating,
                    autocast=floating,
                    layout=layout,
                )
                self._track_variable(variable)  # type: ignore[attr-defined]
        if deferred:
            _compat.forget_uninitialized([variable])
        return variable


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(keras.backend.standardize_dtype(x.dtype)))


def _is_float(variable: Any) -> bool:
    return is_float_dtype(variable.dtype)


def _sides(shape: Sequence[int]) -> tuple[int, int]:
    return (math.prod(shape[:-1]), shape[-1])


def _config_error(owner: str, what: str, expected: str) -> SerializationError:
    return SerializationError(
        f"{owner}: cannot load config entry finetune: {what} is not {expected} for the "
        "configured module; the file was saved from a different module, or tampered with."
    )


_TRANSFORM_KEYS = {"lora": {"kind", "path", "rank", "alpha"}, "int8": {"kind", "path", "dtype"}}


def _check_finetune(data: Any, owner: str, paths: list[str]) -> dict:
    """A config's `finetune` entry, checked entry by entry: known keys and kinds, paths of this
    module's params, plain values; each transform at most once per path, int8 before LoRA."""

    def fail(where: str, why: str) -> SerializationError:
        return SerializationError(f"{owner}: cannot load config entry finetune.{where}: {why}")

    if not isinstance(data, dict) or set(data) != {"frozen", "transforms"}:
        raise fail("(top)", "it must map `frozen` and `transforms`.")
    frozen, transforms = data["frozen"], data["transforms"]
    if not isinstance(frozen, list) or not all(p in paths for p in frozen if isinstance(p, str)):
        raise fail("frozen", "it must list paths of the module's params.")
    if not all(isinstance(p, str) for p in frozen):
        raise fail("frozen", "it must list paths (strings).")
    if not isinstance(transforms, list) or len(transforms) > 2 * len(paths):
        raise fail("transforms", "it must list at most two transforms per param.")
    seen: set[tuple[str, str]] = set()
    checked = []
    for i, entry in enumerate(transforms):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in _TRANSFORM_KEYS or set(entry) != _TRANSFORM_KEYS[kind]:
            raise fail(f"transforms.{i}", f"{entry!r} is not a transform entry.")
        path = entry["path"]
        if not isinstance(path, str) or path not in paths:
            raise fail(f"transforms.{i}.path", f"{path!r} is not a param of the module.")
        if (path, kind) in seen or (kind == "int8" and (path, "lora") in seen):
            raise fail(f"transforms.{i}", f"{kind} on {path!r} is repeated or out of order.")
        seen.add((path, kind))
        if kind == "lora":
            rank, alpha = entry["rank"], entry["alpha"]
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise fail(f"transforms.{i}.rank", f"{rank!r} is not a positive int.")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise fail(f"transforms.{i}.alpha", f"{alpha!r} is not a number.")
            if not math.isfinite(alpha):
                raise fail(f"transforms.{i}.alpha", f"{alpha!r} is not finite.")
            entry = {**entry, "alpha": float(alpha)}
        else:
            dtype = entry["dtype"]
            if dtype not in ("float16", "bfloat16", "float32", "float64"):
                raise fail(f"transforms.{i}.dtype", f"{dtype!r} is not a float dtype name.")
        checked.append(dict(entry))
    return {"frozen": list(frozen), "transforms": checked}
