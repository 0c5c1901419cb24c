"""The `finetune` entry of a layer's config: written from its variables, checked entry by
entry when a file is read, and replayed on the layer the file configures.

    {"frozen": [path, ...],
     "transforms": [{"kind": "int8", "path": ..., "dtype": ...},
                    {"kind": "lora", "path": ..., "rank": ..., "alpha": ...}, ...]}
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from flaxlayer._finetune import FirstValue, add_extra, replace_param, sides
from flaxlayer._saving import SerializationError
from flaxlayer._store import LayerVariables, VariableFactory, struct_of
from flaxlayer._transforms import TRANSFORMS, Int8, LoRA
from flaxlayer._variables import is_float_dtype

_TRANSFORM_KEYS = {"lora": {"kind", "path", "rank", "alpha"}, "int8": {"kind", "path", "dtype"}}
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def finetune_config(store: LayerVariables) -> dict | None:
    """The entry for a layer's variables; None where nothing was fine-tuned."""
    floats = [is_float_dtype(v.dtype) for v in store.param_vars]
    if not store.extras and all(
        v.trainable for v, f in zip(store.param_vars, floats, strict=True) if f
    ):
        return None
    paths = store.param_paths()
    lora_bases = {e.index for e in store.extras if isinstance(e.transform, LoRA)}
    return {
        "frozen": [
            paths[i]
            for i, v in enumerate(store.param_vars)
            if floats[i] and not v.trainable and i not in lora_bases
        ],
        "transforms": [{"path": paths[e.index], **e.transform.to_config()} for e in store.extras],
    }


def replay_finetune(
    store: LayerVariables, factory: VariableFactory, data: Any, first_value: FirstValue
) -> None:
    """Re-applies a config's transforms and frozen paths to a layer being loaded: the
    variables are created without values, as the module's own are, for the weights file."""
    owner = factory.owner
    paths = store.param_paths()
    config = check_finetune(data, owner, paths)
    for entry in config["transforms"]:
        index = paths.index(entry.pop("path"))
        transform = TRANSFORMS[entry.pop("kind")](**entry)
        base = struct_of(store.param_vars[index])
        if isinstance(transform, Int8):
            if not (base.dtype == jnp.dtype(transform.dtype) and len(base.shape) >= 2):
                raise _config_error(owner, f"int8 on {paths[index]!r}", "a float kernel")
            int8 = jax.ShapeDtypeStruct(base.shape, jnp.int8)
            replace_param(store, factory, index, int8, first_value)
        elif isinstance(transform, LoRA) and not 1 <= transform.rank <= min(sides(base.shape)):
            raise _config_error(owner, f"the LoRA rank on {paths[index]!r}", "in range")
        structs = transform.extra_structs(base)
        add_extra(store, factory, index, transform, [None] * len(structs), structs, first_value)
        if isinstance(transform, LoRA):
            store.param_vars[index].trainable = False
    for path in config["frozen"]:
        store.param_vars[paths.index(path)].trainable = False


def _config_error(owner: str, what: str, expected: str) -> SerializationError:
    return SerializationError(
        f"{owner}: cannot load config entry finetune: {what} is not {expected} for the "
        "configured module; the file was saved from a different module, or tampered with."
    )


class _Failure:
    """Makes the errors of one layer's `finetune` entry, each naming where in it."""

    def __init__(self, owner: str):
        self.owner = owner

    def __call__(self, where: str, why: str) -> SerializationError:
        return SerializationError(f"{self.owner}: cannot load config entry finetune.{where}: {why}")


def check_finetune(data: Any, owner: str, paths: list[str]) -> dict:
    """A config's `finetune` entry, checked entry by entry: known keys and kinds, paths of this
    module's params, plain values; each transform at most once per path, int8 before LoRA."""
    fail = _Failure(owner)
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
    checked = [
        _check_transform(entry, f"transforms.{i}", paths, seen, fail)
        for i, entry in enumerate(transforms)
    ]
    return {"frozen": list(frozen), "transforms": checked}


def _check_transform(entry: Any, where: str, paths: list[str], seen: set, fail: _Failure) -> dict:
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in _TRANSFORM_KEYS or set(entry) != _TRANSFORM_KEYS[kind]:
        raise fail(where, f"{entry!r} is not a transform entry.")
    path = entry["path"]
    if not isinstance(path, str) or path not in paths:
        raise fail(f"{where}.path", f"{path!r} is not a param of the module.")
    if (path, kind) in seen or (kind == "int8" and (path, "lora") in seen):
        raise fail(where, f"{kind} on {path!r} is repeated or out of order.")
    seen.add((path, kind))
    if kind == "lora":
        return {**entry, "alpha": _check_lora(entry, where, fail)}
    if entry["dtype"] not in _FLOAT_DTYPES:
        raise fail(f"{where}.dtype", f"{entry['dtype']!r} is not a float dtype name.")
    return dict(entry)


def _check_lora(entry: dict, where: str, fail: _Failure) -> float:
    rank, alpha = entry["rank"], entry["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise fail(f"{where}.rank", f"{rank!r} is not a positive int.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise fail(f"{where}.alpha", f"{alpha!r} is not a number.")
    if not math.isfinite(alpha):
        raise fail(f"{where}.alpha", f"{alpha!r} is not finite.")
    return float(alpha)
