"""Adapter for `flax.linen` modules.

At build time, under `jax.eval_shape` only, the adapter learns which rng streams the method asks
for (in training and at inference), which collections are real state (stable across calls) and
which are sown per call ("intermediates", "losses", ...). `LinenCodec` writes a module's
configuration to a `.keras` file and reads it back.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax.core import meta

from flaxlayer._adapter import (
    SPEC_KEY,
    ModuleAdapter,
    Plan,
    raise_mismatches,
    shape_mismatches,
)
from flaxlayer._methods import resolve_method
from flaxlayer._saving import TAG, KindCodec, schema
from flaxlayer._variables import flatten_with_paths

SOWN_BY_CONVENTION = ("intermediates", "losses")
LOSSES = "losses"
_MAX_STREAMS = 64
_STREAM_NAME = re.compile(r'needs PRNG for "([^"]+)"')


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def _partition_spec(box: Any) -> Any:
    if isinstance(box, nn.LogicallyPartitioned):
        # Logical names become mesh axes by the box's rules or the `nn.logical_axis_rules`
        # in effect while the layer is built.
        axes = nn.logical_to_mesh_axes(box.names, box.rules)
        return jax.sharding.PartitionSpec(*(axes or ()))
    return box.get_partition_spec()


def _split_keys(rng, streams: tuple[str, ...]):
    if not streams:
        return None
    keys = jax.random.split(rng, len(streams))
    return {name: keys[i] for i, name in enumerate(streams)}


def _same_structure(a: Any, b: Any) -> bool:
    structure: Any = jax.tree.structure(a)  # jaxlib's PyTreeDef, which mypy cannot read
    return structure == jax.tree.structure(b) and all(
        np.shape(x) == np.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _one_line(text: str, limit: int = 1500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def sum_losses(collection: Any):
    leaves = jax.tree.leaves(collection)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(leaf).astype(jnp.float32) for leaf in leaves)


class LinenCodec(KindCodec):
    """A Linen module in a config: its class and dataclass fields (or its own `get_config`)."""

    entries = schema(("module", {"class"}, {"fields", "custom_config"}))
    class_bases = (nn.Module,)
    module_base = nn.Module

    @classmethod
    def encodes(cls, value: Any) -> bool:
        return isinstance(value, nn.Module)

    def encode(self, value: Any, where: str) -> dict:
        cls = type(value)
        ref = self.coder.class_ref(cls, where, instantiated=True)
        if callable(getattr(cls, "get_config", None)) and callable(
            getattr(cls, "from_config", None)
        ):
            return {TAG: "module", "class": ref, "custom_config": value.get_config()}
        return {TAG: "module", "class": ref, "fields": self.coder.fields(value, cls)}

    def check(self, data: dict, path: tuple, depth: int, declared: Any) -> None:
        decoder = self.coder
        cls = decoder.check_class(data, path, (nn.Module,), "a Linen module class")
        decoder.instantiated(cls)
        if "custom_config" in data:
            if not callable(getattr(cls, "from_config", None)):
                raise decoder.fail(
                    path,
                    f"{cls.__name__} has no classmethod from_config, so it cannot be rebuilt "
                    "from a custom config; the file may have been tampered with.",
                )
            return
        fields = data.get("fields", {})
        if not isinstance(fields, dict):
            raise decoder.fail((*path, "fields"), "fields must be a mapping.")
        decoder.check_fields(cls, fields, (*path, "fields"), depth)

    def decode(self, data: dict, path: tuple) -> Any:
        decoder = self.coder
        cls = decoder.class_of(data)
        if "custom_config" in data:
            config = data["custom_config"]
            return decoder.construct(
                path, lambda: cls.from_config(config), f"{cls.__name__}.from_config"
            )
        fields = decoder.fields_of(data, path)
        return decoder.construct(path, lambda: cls(**fields), f"constructing {cls.__name__}")


class LinenAdapter(ModuleAdapter):
    framework = nn.Module.__mro__
    module_base = nn.Module
    codec = LinenCodec

    def __init__(self, module: nn.Module, method: Any, *, owner: str):
        super().__init__(module, method, owner=owner)
        self.module = module
        self.method = resolve_method(module, method, owner=owner, framework=self.framework)
        self.streams: dict[bool, tuple[str, ...]] = {False: (), True: ()}
        self.init_streams: tuple[str, ...] = ("dropout", "params")
        self.state_collections: tuple[str, ...] = ()
        self.boxed: Any = None

    def _init(self, rng, inputs):
        args, kwargs = self.method.arguments(inputs, False)
        return self.module.init(
            _split_keys(rng, self.init_streams), *args, method=self.method.fn, **kwargs
        )

    def _apply(self, variables, rngs, inputs, training):
        args, kwargs = self.method.arguments(inputs, training)
        return self.module.apply(
            variables,
            *args,
            rngs=rngs,
            method=self.method.fn,
            mutable=nn.DenyList("params"),
            **kwargs,
        )

    def _discover_streams(self, variables, inputs, training):
        """The streams the method asks for: traced abstractly until none is missing."""
        streams: list[str] = []
        for _ in range(_MAX_STREAMS):
            rngs = {name: SPEC_KEY for name in streams} or None
            try:
                return tuple(sorted(streams)), jax.eval_shape(
                    lambda v, r, x: self._apply(v, r, x, training), variables, rngs, inputs
                )
            except flax_errors.InvalidRngError as e:
                match = _STREAM_NAME.search(str(e))
                if match is None or match.group(1) in streams:
                    raise
                streams.append(match.group(1))
        raise RuntimeError(f"{self.owner}: the module asks for more than {_MAX_STREAMS} streams.")

    def plan(self, inputs):
        boxed = jax.eval_shape(self._init, SPEC_KEY, inputs)
        self.boxed = boxed
        abstract = meta.unbox(boxed)
        candidates = [c for c in abstract if c != "params" and c not in SOWN_BY_CONVENTION]
        # A collection is state if a training call hands it back unchanged in structure; a
        # collection that grows (sown into) is per-call output. Repeat until that is stable.
        for _ in range(len(candidates) + 1):
            variables = {c: abstract[c] for c in ("params", *candidates) if c in abstract}
            results: dict[bool, Any] = {}
            for training in (False, True):
                if training and not self.method.takes_training:
                    # The method never sees the flag: both modes run the same computation.
                    self.streams[True], results[True] = self.streams[False], results[False]
                    continue
                self.streams[training], results[training] = self._discover_streams(
                    variables, inputs, training
                )
            mutated = results[True][1]
            stable = [c for c in candidates if _same_structure(abstract[c], mutated.get(c, {}))]
            if stable == candidates:
                break
            candidates = stable
        self.state_collections = tuple(candidates)
        self.init_streams = tuple(
            sorted({"params", "dropout", *self.streams[False], *self.streams[True]})
        )
        params = {"params": abstract["params"]} if "params" in abstract else {}
        sows_loss = [bool(jax.tree.leaves(results[t][1].get(LOSSES, {}))) for t in (False, True)]
        return Plan(
            trees=(params, {c: abstract[c] for c in self.state_collections}),
            needs_rng=(bool(self.streams[False]), bool(self.streams[True])),
            has_loss=(sows_loss[0], sows_loss[1]),
            partition_specs=self._partition_specs(),
        )

    def init(self, rng, inputs):
        variables = meta.unbox(self._init(rng, inputs))
        params = {"params": variables.pop("params")} if "params" in variables else {}
        state = {c: variables.pop(c) for c in self.state_collections}
        return params, state

    def given(self, initial, plan, inputs):
        variables = meta.unbox(dict(initial))
        exp_params, exp_state = plan.trees
        expected_all = {**exp_params, **exp_state}
        if "params" in exp_params and variables and not set(variables) & set(expected_all):
            # The params tree alone, as Hugging Face's `model.params` holds it.
            variables = {"params": variables}
        sown = [c for c in variables if c not in expected_all and c in SOWN_BY_CONVENTION]
        for c in sown:
            variables.pop(c)
        problems = shape_mismatches(expected_all, variables)
        same_paths = not any("missing" in p or "not created" in p for p in problems)
        if problems and not same_paths:
            raise_mismatches(
                self.owner,
                "variables",
                problems,
                "Pass the dict `module.init(...)` returns for inputs of this shape, or "
                "variables=None to initialize at build time.",
            )
        if problems:
            # Not what init makes for these inputs, but maybe what the module applies to (a
            # decode cache initialized for the full length, applied one token at a time).
            failure = self._refuses(variables, inputs)
            if failure is not None:
                raise_mismatches(
                    self.owner,
                    "variables",
                    [*problems, failure],
                    "Pass the dict `module.init(...)` returns (for these inputs, or for the "
                    "shapes the module is applied to, such as a decode cache's full length), or "
                    "variables=None to initialize at build time.",
                )
        params = {"params": variables["params"]} if "params" in variables else {}
        return params, {c: variables[c] for c in self.state_collections}

    def _refuses(self, variables: dict, inputs: Any) -> str | None:
        """Why the module cannot be applied to `variables` (abstractly, both modes), or None.

        Applying must work and hand every state collection back with the shapes it was given.
        """
        state = [c for c in self.state_collections if c in variables]
        for training in (False, True):
            rngs = {name: SPEC_KEY for name in self.streams[training]} or None
            try:
                _, mutated = jax.eval_shape(
                    lambda v, r, x, t=training: self._apply(v, r, x, t), variables, rngs, inputs
                )
            except Exception as e:  # the module's own error for variables it cannot use
                return f"applying the module to them fails: {type(e).__name__}: {e}"
            changed = [c for c in state if not _same_structure(variables[c], mutated.get(c, {}))]
            if changed:
                return f"applying the module changes the shapes of {', '.join(changed)}"
        return None

    def apply(self, params, state, rng, inputs, training):
        rngs = _split_keys(rng, self.streams[training])
        outputs, mutated = self._apply({**params, **state}, rngs, inputs, training)
        new_state = {c: mutated.get(c, state[c]) for c in state}
        return outputs, new_state, sum_losses(mutated.get(LOSSES, {}))

    def _partition_specs(self) -> dict:
        if self.boxed is None:
            return {}
        leaves, paths, _ = flatten_with_paths(self.boxed, is_leaf=_is_box)
        return {
            path: _partition_spec(leaf)
            for path, leaf in zip(paths, leaves, strict=True)
            if _is_box(leaf) and hasattr(leaf, "get_partition_spec")
        }

    def model_name(self) -> str:
        return f"Linen module {type(self.module).__name__}"

    def summary(self) -> str:
        return _one_line(repr(self.module))

    def module_object(self, values) -> nn.Module:
        return self.module

    def given_entry(self, params: dict, state: dict) -> dict:
        return {**params, **state}

    def export(self, params: dict, state: dict) -> dict:
        """The variables dict `module.init` returns, boxed again where init returned boxes."""
        values = {**params, **state}
        if self.boxed is None or not any(
            _is_box(x) for x in jax.tree.leaves(self.boxed, is_leaf=_is_box)
        ):
            return values
        boxed = {c: self.boxed[c] for c in values}
        return jax.tree.map(
            lambda box, value: box.replace_boxed(value) if _is_box(box) else value,
            boxed,
            values,
            is_leaf=_is_box,
        )
