"""Parameter transforms by Flax path: the params a module sees, computed from stored variables.

A transform sits between a layer's Keras variables and the tree its module sees, inside the
pure function the engine runs, so it is traced, differentiated and compiled with every call.
`LoRA` adds a trainable low-rank update to a frozen kernel; `Int8` stores a kernel as int8
with a float scale per output channel. One leaf may carry both, in that order (QLoRA).
"""

import abc
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


class Transform(abc.ABC):
    """How one module param leaf is computed from its stored value and the extras it adds."""

    #: The name under which a layer's config records it.
    kind: ClassVar[str]
    #: Names of the stored leaves it adds, in order (`<kind>/<flax path>/<name>` variables).
    extras: ClassVar[tuple[str, ...]]
    #: Whether those extras are trained.
    trainable: ClassVar[bool]

    @abc.abstractmethod
    def extra_structs(self, stored: jax.ShapeDtypeStruct) -> list[jax.ShapeDtypeStruct]:
        """Shapes and dtypes of the extras, for a leaf stored as `stored`."""

    @abc.abstractmethod
    def apply(self, value: jax.Array, extras: Sequence[jax.Array]) -> jax.Array:
        """The leaf as the module sees it (pure JAX: runs inside the compiled call)."""

    def to_config(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]


@dataclasses.dataclass(frozen=True)
class LoRA(Transform):
    """`kernel + (a @ b).reshape(kernel.shape) * alpha / rank`; N-D kernels as 2-D
    `(prod(all but last), last)`. `b` starts at zero, so enabling changes no output."""

    rank: int
    alpha: float

    kind = "lora"
    extras = ("a", "b")
    trainable = True

    def extra_structs(self, stored):
        rows = math.prod(stored.shape[:-1])
        return [
            jax.ShapeDtypeStruct((rows, self.rank), jnp.float32),
            jax.ShapeDtypeStruct((self.rank, stored.shape[-1]), jnp.float32),
        ]

    def apply(self, value, extras):
        a, b = extras
        delta = (a @ b) * (self.alpha / self.rank)
        return value + delta.reshape(value.shape).astype(value.dtype)


@dataclasses.dataclass(frozen=True)
class Int8(Transform):
    """A kernel stored as int8 with one scale per output channel (the last axis), in the
    kernel's dtype: the module sees `int8 * scale` (in the compute dtype under a mixed
    precision policy, as Keras autocasts the scale)."""

    dtype: str

    kind = "int8"
    extras = ("scale",)
    trainable = False

    def extra_structs(self, stored):
        return [jax.ShapeDtypeStruct((stored.shape[-1],), jnp.dtype(self.dtype))]

    def apply(self, value, extras):
        (scale,) = extras
        return value.astype(scale.dtype) * scale


TRANSFORMS: dict[str, type[Transform]] = {t.kind: t for t in (LoRA, Int8)}


def quantize_int8(kernel: Any) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8: `(q, scale)` with `q * scale ~= kernel`."""
    kernel = jnp.asarray(kernel, jnp.float32)
    amax = jnp.max(jnp.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
    return q, scale


@dataclasses.dataclass(frozen=True)
class Applied:
    """A transform on module param `index`; `extras` index the stored list after the module's."""

    index: int
    transform: Transform
    extras: tuple[int, ...]


def module_params(stored: Sequence[Any], applied: Sequence[Applied], count: int) -> list:
    """The module's `count` param leaves from the stored ones (module leaves, then extras)."""
    params = list(stored[:count])
    for a in applied:
        params[a.index] = a.transform.apply(params[a.index], [stored[i] for i in a.extras])
    return params


def select(
    patterns: str | Sequence[str] | None, paths: Sequence[str], *, default: Sequence[str] = ()
) -> list[str]:
    """The paths that one of `patterns` matches entirely (`re.fullmatch`); `default` if None.

    Raises ValueError for a pattern that is not a string or matches nothing, with a few paths.
    """
    if patterns is None:
        return list(default)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"a path pattern must be a regex string; got {pattern!r}.")
        matched = [p for p in paths if re.fullmatch(pattern, p)]
        if not matched:
            shown = ", ".join(repr(p) for p in list(paths)[:8])
            more = f", ... ({len(paths) - 8} more)" if len(paths) > 8 else ""
            raise ValueError(
                f"the pattern {pattern!r} matches no variable path (patterns match a whole "
                f"path, as shown by layer.describe()). Paths: {shown}{more}."
            )
        chosen += [p for p in matched if p not in chosen]
    return chosen
