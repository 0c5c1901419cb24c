"""JaxLayer: the engine every flaxlayer layer runs on."""

import contextlib
import random
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import errors as flax_errors
from flax.core import partial_eval

from flaxlayer._adapter import SPEC_KEY, Adapter
from flaxlayer._bridges import check_backend, compile_for_backend, outside_compiled_graphs
from flaxlayer._describe import describe_layer
from flaxlayer._distribution import (
    active_distribution,
    backend_sharding,
    current_scope_path,
    variable_layouts,
)
from flaxlayer._functions import FunctionAdapter
from flaxlayer._variables import (
    create_variables,
    flatten_with_paths,
    in_stateless_scope,
    is_float_dtype,
)

# Unknown dimensions are probed at two sizes to tell which output dimensions follow them.
_PROBE_SIZES = (8, 12)


class _Leaf:
    """Shape (with None for unknown dimensions) and dtype of one input leaf."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def struct(self, fill: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(fill if d is None else d for d in self.shape), self.dtype)


def _leaf_dtype(dtype: Any, float_dtype: str) -> Any:
    dtype = keras.backend.standardize_dtype(dtype) if dtype is not None else float_dtype
    return float_dtype if is_float_dtype(dtype) else dtype


def _spec_of(inputs: Any, float_dtype: str) -> Any:
    def leaf(x):
        return _Leaf(
            tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape),
            _leaf_dtype(getattr(x, "dtype", None), float_dtype),
        )

    return keras.tree.map_structure(leaf, inputs)


def _is_shape(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(d is None or isinstance(d, int) for d in x)


def _spec_from_shapes(shapes: Any, float_dtype: str) -> Any:
    if _is_shape(shapes):
        return _Leaf(shapes, float_dtype)
    if isinstance(shapes, dict):
        return {k: _spec_from_shapes(v, float_dtype) for k, v in shapes.items()}
    if isinstance(shapes, (tuple, list)):
        return type(shapes)(_spec_from_shapes(v, float_dtype) for v in shapes)
    raise ValueError(f"Cannot read an input shape from {shapes!r}.")


def _structs(spec: Any, fill: int) -> Any:
    return jax.tree.map(
        lambda leaf: leaf.struct(fill), spec, is_leaf=lambda x: isinstance(x, _Leaf)
    )


def _has_unknown(spec: Any) -> bool:
    leaves = jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, _Leaf))
    return any(d is None for leaf in leaves for d in leaf.shape)


def _merge_probes(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct) -> keras.KerasTensor:
    shape = tuple(x if x == y else None for x, y in zip(a.shape, b.shape, strict=True))
    return keras.KerasTensor(shape, dtype=keras.backend.standardize_dtype(a.dtype))


class _Core:
    """What a layer holds besides its Keras variables (kept off Keras's attribute tracking)."""

    def __init__(self, adapter: Adapter, initial: Any):
        self.adapter = adapter
        self.initial = initial
        self.input_spec: Any = None
        self.param_vars: list = []
        self.state_vars: list = []
        self.params_def = self.state_def = None
        self.pure: Callable | None = None
        self.run: Callable | None = None
        self.needs_rng = {False: False, True: False}
        self.has_loss = {False: False, True: False}
        # Per training mode, the indices of the state leaves a call can change (learned at the
        # first call in that mode): the compiled function returns only those, and only those
        # are written back. BatchNorm statistics at inference, for instance, are never copied.
        self.written: dict[bool, tuple[int, ...]] = {}
        self.learn_written: Callable[[bool], tuple[int, ...]] | None = None


@keras.saving.register_keras_serializable(package="flaxlayer")
class JaxLayer(keras.layers.Layer):
    """A Keras layer from a pure JAX function: plain JAX, Haiku, or anything `init`/`apply`-shaped.

    `call_fn` takes any of `params`, `state`, `rng`, `inputs`, `training` by those names, in any
    order (`inputs` is required). `init_fn` takes any of `rng`, `inputs`, `training` (`inputs`
    required) and is run at build time on zeros shaped like the first inputs (unknown dimensions
    become 1). When `call_fn` takes `state`, it returns `(outputs, new_state)` and `init_fn`
    returns `(params, state)`; the new state is written back to the layer's non-trainable
    variables after each call.

    `params` become trainable Keras variables named `<layer>/params/<path>`, `state` non-trainable
    ones named `<layer>/state/<path>`. `rng` is a fresh `jax.random` key per call, drawn from a
    `keras.random.SeedGenerator(seed)`: reproducible under `keras.utils.set_random_seed`.

    Args:
        call_fn: The forward function.
        init_fn: Creates the initial `params` (and `state`); optional if they are given.
        params: Initial params (any pytree of arrays), used instead of `init_fn`'s.
        state: Initial state (any pytree of arrays), used instead of `init_fn`'s.
        seed: Seed for the keys passed as `rng` (and to `init_fn`).
        **kwargs: Keras layer arguments (`name`, `dtype`, `trainable`, ...).

    Example:

    >>> import jax, jax.numpy as jnp, keras
    >>> def init_fn(rng, inputs):
    ...     return {"w": jax.random.normal(rng, (inputs.shape[-1], 3)), "b": jnp.zeros(3)}
    >>> def call_fn(params, inputs):
    ...     return inputs @ params["w"] + params["b"]
    >>> layer = JaxLayer(call_fn, init_fn)
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
    >>> [w.path for w in layer.weights]
    ['jax_layer/params/b', 'jax_layer/params/w']
    """

    def __init__(
        self,
        call_fn: Callable,
        init_fn: Callable | None = None,
        params: Any = None,
        state: Any = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.call_fn, self.init_fn = call_fn, init_fn
        adapter = FunctionAdapter(
            call_fn,
            init_fn,
            has_params=params is not None,
            has_state=state is not None,
            owner=self._owner_name(),
        )
        initial = None if params is None and state is None else (params, state)
        self._setup(adapter, initial, seed, kwargs)

    def _owner_name(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    def _setup(self, adapter: Adapter, initial: Any, seed: int | None, kwargs: dict) -> None:
        check_backend(self._owner_name())
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # The init key comes from Python, not from the generator's state: a build may run inside
        # a TensorFlow graph or a torch meta trace, where that state has no value.
        self._init_seed = seed if seed is not None else random.randint(1, 10**9)
        self._policy_given = kwargs.get("dtype") is not None or (
            keras.config.dtype_policy().name != "float32"
        )
        self._core = _Core(adapter, initial)

    # ----------------------------------------------------------------------------------- build

    def __call__(self, *args, **kwargs):
        if not self.built:
            inputs = args[0] if args else kwargs.get("inputs")
            self._core.input_spec = _spec_of(inputs, self.compute_dtype)
        return super().__call__(*args, **kwargs)

    def build(self, input_shape=None):
        core, adapter = self._core, self._core.adapter
        spec = core.input_spec
        if spec is None:
            if input_shape is None:
                raise ValueError(
                    f"{self._owner_name()}: build() needs the input shape, e.g. "
                    "layer.build((None, 28, 28, 1)); or call the layer on inputs."
                )
            spec = _spec_from_shapes(input_shape, self.compute_dtype)
        core.input_spec = spec
        inputs = _structs(spec, 1)
        # Keras may build inside its own symbolic trace (a subclassed model first seen by fit):
        # initial values must still be concrete there. Only there: op-by-op evaluation of the
        # initializers costs time and memory.
        given = core.initial is not None
        owner = self._owner_name()
        concrete = jax.ensure_compile_time_eval if in_stateless_scope() else contextlib.nullcontext
        with concrete():
            expected = adapter.plan(inputs)
            layouts = self._plan_layouts(expected)
            if given:
                params, state = adapter.given(core.initial, expected)
            elif expected is None:
                params, state = {}, {}
            else:
                rng = _init_key(self._init_seed) if adapter.init_uses_rng else None
                if layouts and adapter.init_uses_rng:
                    # Each leaf is created already sharded, never whole on one device.
                    init = jax.jit(
                        adapter.init, out_shardings=_sharding_trees(expected, layouts, adapter)
                    )
                    params, state = init(rng, _zeros(inputs))
                else:
                    params, state = _init_without_forward(adapter.init, rng, inputs)
        core.initial = None  # the variables below now own these values

        p_leaves, p_paths, core.params_def = flatten_with_paths(params)
        s_leaves, s_paths, core.state_def = flatten_with_paths(state)
        del params, state
        layout_for = layouts.get if layouts else None
        core.param_vars = create_variables(
            p_leaves,
            p_paths,
            owner=owner,
            prefix=adapter.params_prefix,
            trainable=True,
            dtype_for=self._variable_dtype_for,
            copy=given,  # the caller keeps what it passed; what init made is moved
            layout_for=layout_for,
        )
        core.state_vars = create_variables(
            s_leaves,
            s_paths,
            owner=owner,
            prefix=adapter.state_prefix,
            trainable=False,
            dtype_for=self._variable_dtype_for,
            copy=given,
            layout_for=layout_for,
        )
        for variable in core.param_vars + core.state_vars:
            self._track_variable(variable)
        core.needs_rng = dict(adapter.needs_rng)
        core.has_loss = dict(adapter.has_loss)
        mixed = self.autocast and self.compute_dtype != self.variable_dtype
        state_casts = [
            self.compute_dtype if mixed and is_float_dtype(v.dtype) else None
            for v in core.state_vars
        ]
        core.written = {}
        core.pure = _make_pure(
            adapter, core.params_def, core.state_def, owner, state_casts, core.written
        )
        core.run = compile_for_backend(core.pure, owner=owner)
        core.learn_written = outside_compiled_graphs(self._written_state)

    def _plan_layouts(self, expected: Any) -> dict | None:
        """{variable path parts: TensorLayout} under a keras.distribution, else None."""
        distribution = active_distribution()
        if distribution is None or expected is None:
            return None
        adapter = self._core.adapter
        base = tuple(p for p in current_scope_path().split("/") if p)
        parts, shapes = [], []
        for tree, prefix in (
            (expected[0], adapter.params_prefix),
            (expected[1], adapter.state_prefix),
        ):
            leaves, paths, _ = flatten_with_paths(tree)
            parts += [prefix + p for p in paths]
            shapes += [tuple(leaf.shape) for leaf in leaves]
        specs = {"/".join(base + k): v for k, v in adapter.partition_specs().items()}
        layouts = variable_layouts(
            distribution,
            ["/".join(base + p) for p in parts],
            shapes,
            specs,
            owner=self._owner_name(),
        )
        return dict(zip(parts, layouts, strict=True))

    def _variable_dtype_for(self, dtype: Any) -> Any:
        if self._policy_given and is_float_dtype(dtype):
            return self.variable_dtype
        return keras.backend.standardize_dtype(dtype)

    # ------------------------------------------------------------------------------------ call

    def call(self, inputs, training=None):
        core = self._core
        training = bool(training)
        rng = self.seed_generator.next() if core.needs_rng[training] else None
        written = core.written.get(training)
        if written is None:
            written = core.written[training] = core.learn_written(training)
        outputs, new_state, loss = core.run(
            [v.value for v in core.param_vars],
            [v.value for v in core.state_vars],
            rng,
            inputs,
            training=training,
        )
        for index, value in zip(written, new_state, strict=True):
            core.state_vars[index].assign(value)
        if core.has_loss[training]:
            self.add_loss(loss)
        return outputs

    def _abstract_arguments(self, training: bool) -> tuple:
        core = self._core
        cast = self.autocast and self.compute_dtype != self.variable_dtype
        params = [self._struct_of(v, cast) for v in core.param_vars]
        state = [self._struct_of(v, False) for v in core.state_vars]  # pure() casts state
        rng = SPEC_KEY if core.needs_rng[training] else None
        return params, state, rng

    def _written_state(self, training: bool) -> tuple[int, ...]:
        """Indices of the state leaves a call in this mode may change (one abstract trace).

        A leaf the module hands back untouched is its input variable itself in the traced
        program, or under mixed precision that variable cast to the compute dtype (which
        writing back would only round); any other operation on it counts as a change.
        """
        core = self._core
        if not core.state_vars:
            return ()
        params, state, rng = self._abstract_arguments(training)
        closed = jax.make_jaxpr(
            lambda p, s, r, x: core.pure(p, s, r, x, training, all_state=True)[1]
        )(params, state, rng, _structs(core.input_spec, 1))
        state_in = closed.jaxpr.invars[len(params) : len(params) + len(state)]
        cast_of = {
            id(eqn.outvars[0]): eqn.invars[0]
            for eqn in closed.jaxpr.eqns
            if eqn.primitive.name == "convert_element_type"
        }
        return tuple(
            i
            for i, (out, var) in enumerate(zip(closed.jaxpr.outvars, state_in, strict=True))
            if out is not var and cast_of.get(id(out)) is not var
        )

    def compute_output_spec(self, inputs, training=None):
        core = self._core
        training = bool(training)
        spec = _spec_of(inputs, self.compute_dtype)
        params, state, rng = self._abstract_arguments(training)

        def probe(fill):
            return jax.eval_shape(
                lambda p, s, r, x: core.pure(p, s, r, x, training)[0],
                params,
                state,
                rng,
                _structs(spec, fill),
            )

        first = probe(_PROBE_SIZES[0])
        second = probe(_PROBE_SIZES[1]) if _has_unknown(spec) else first
        return jax.tree.map(_merge_probes, first, second)

    def _struct_of(self, variable, cast: bool) -> jax.ShapeDtypeStruct:
        dtype = variable.dtype
        if cast and is_float_dtype(dtype):  # flaxlayer autocasts exactly its float variables
            dtype = self.compute_dtype
        return jax.ShapeDtypeStruct(tuple(variable.shape), jnp.dtype(dtype))

    # ---------------------------------------------------------------------------- saving

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            call_fn=keras.saving.serialize_keras_object(self.call_fn),
            init_fn=keras.saving.serialize_keras_object(self.init_fn),
            seed=self.seed,
        )
        if self.init_fn is None:
            # Nothing can re-create the params: record their shapes, the weights file the values.
            params, state = self._trees_for_config()
            config.update(params=_spec_to_config(params), state=_spec_to_config(state))
        return config

    def _trees_for_config(self) -> tuple[Any, Any]:
        core = self._core
        if self.built:
            trees = (
                core.params_def.unflatten(core.param_vars),
                core.state_def.unflatten(core.state_vars),
            )
        else:
            trees = core.initial or (None, None)
        return tuple(
            None if t is None else jax.tree.map(lambda x: _Leaf(np.shape(x), _dtype_name(x)), t)
            for t in trees
        )

    @classmethod
    def from_config(cls, config: dict) -> "JaxLayer":
        config = dict(config)
        for name in ("call_fn", "init_fn"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(config[name])
        for name in ("params", "state"):
            if config.get(name) is not None:
                config[name] = jax.tree.map(
                    lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                    _spec_from_config(config[name]),
                    is_leaf=lambda x: isinstance(x, _Leaf),
                )
        return super().from_config(config)

    def get_build_config(self) -> dict | None:
        if self._core.input_spec is None:
            return None
        return {"input_spec": _spec_to_config(self._core.input_spec)}

    def build_from_config(self, config: dict) -> None:
        if config and "input_spec" in config:
            self._core.input_spec = _spec_from_config(config["input_spec"])
            self.build(None)
        else:
            super().build_from_config(config)

    def load_own_variables(self, store) -> None:
        variables = self._trainable_variables + self._non_trainable_variables
        owner = self._owner_name()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"{owner}: the weights file holds {len(store.keys())} variables for this layer, "
                f"but the layer has {len(variables)}. The file was saved from a different "
                "model or module configuration."
            )
        values = [store[str(i)] for i in range(len(variables))]
        problems = [
            f"{v.path}: layer has shape {tuple(v.shape)}, file has {tuple(value.shape)}"
            for v, value in zip(variables, values, strict=True)
            if tuple(value.shape) != tuple(v.shape)
        ]
        if problems:
            raise ValueError(
                f"{owner}: the weights file does not match the module:\n  "
                + "\n  ".join(problems)
                + "\nNo weight was loaded. Load a file saved from this module configuration."
            )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)

    # ------------------------------------------------------------------------------ the trees

    @property
    def params(self) -> Any:
        """The trainable variables as a pytree mirroring the params tree (after build)."""
        self._check_built("params")
        return self._core.params_def.unflatten(self._core.param_vars)

    @property
    def state(self) -> Any:
        """The non-trainable variables as a pytree mirroring the state tree (after build)."""
        self._check_built("state")
        return self._core.state_def.unflatten(self._core.state_vars)

    def describe(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Prints the layer's variable tree as a table, one row per variable.

        `model.summary()` shows the layer as one row; this is the view inside it that Flax users
        get from `nn.tabulate`. Each row gives the Flax path (`params/Dense_0/kernel`,
        `batch_stats/BatchNorm_0/mean`; for NNX the attribute path, `linear1/kernel`; for a
        JaxLayer the pytree path under `params/` or `state/`), the shape, the dtype, whether the
        variable is trainable (as in `layer.trainable_weights`: params are, state such as
        `batch_stats` is not, and none are once `layer.trainable = False`) and its element
        count. A last line gives the totals, with bytes, as `model.summary()` counts them.

        Args:
            print_fn: Called with each line of the table, as `model.summary(print_fn=...)` is.
                Defaults to `print`. Pass `lines.append` to capture the table.

        Returns:
            None, like `model.summary()`.

        Raises:
            ValueError: if the layer is not built yet (call it once on inputs, or
                `layer.build(input_shape)`).

        Example:

        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from flaxlayer import FlaxLayer
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, inputs, training):
        ...         x = nn.Dense(4)(inputs)
        ...         return nn.BatchNorm(use_running_average=not training)(x)
        >>> layer = FlaxLayer(Net(), name="net")
        >>> layer.build((None, 3))
        >>> layer.describe()  # doctest: +NORMALIZE_WHITESPACE
        FlaxLayer 'net' (Linen module Net)
        path                          shape   dtype    trainable  count
        ---------------------------------------------------------------
        params/BatchNorm_0/bias       (4,)    float32  yes            4
        params/BatchNorm_0/scale      (4,)    float32  yes            4
        params/Dense_0/bias           (4,)    float32  yes            4
        params/Dense_0/kernel         (3, 4)  float32  yes           12
        batch_stats/BatchNorm_0/mean  (4,)    float32  no             4
        batch_stats/BatchNorm_0/var   (4,)    float32  no             4
        ---------------------------------------------------------------
        Total: 32 params (128.00 B); trainable: 24 (96.00 B); non-trainable: 8 (32.00 B)
        """
        describe_layer(self, print_fn)

    def _values(self) -> tuple[Any, Any]:
        """Copies of the current values as JAX arrays: snapshots the caller may keep.

        Not views: Keras's JAX trainer donates the variables' buffers to each compiled step, so
        an array shared with a variable is deleted by the next `fit`, `evaluate` or `predict`.
        """
        core = self._core
        as_jax = [
            jnp.asarray(keras.ops.convert_to_numpy(v.value))
            if keras.backend.backend() != "jax"
            else jnp.copy(v.value)
            for v in core.param_vars + core.state_vars
        ]
        n = len(core.param_vars)
        return core.params_def.unflatten(as_jax[:n]), core.state_def.unflatten(as_jax[n:])

    def _check_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(
                f"{self._owner_name()}: `{what}` exists once the layer is built. Call the layer "
                "on inputs (or model.build / layer.build(input_shape)) first."
            )


def _sharding_trees(expected: tuple[Any, Any], layouts: dict, adapter: Adapter) -> tuple:
    """Out-shardings for `init`, shaped like its (params, state) result."""
    trees = []
    for tree, prefix in zip(expected, (adapter.params_prefix, adapter.state_prefix), strict=True):
        _, paths, treedef = flatten_with_paths(tree)
        trees.append(treedef.unflatten([backend_sharding(layouts[prefix + p]) for p in paths]))
    return tuple(trees)


def _dtype_name(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _spec_to_config(spec: Any) -> Any:
    if isinstance(spec, _Leaf):
        return {"shape": list(spec.shape), "dtype": keras.backend.standardize_dtype(spec.dtype)}
    if isinstance(spec, dict):
        return {"dict": [[k, _spec_to_config(v)] for k, v in spec.items()]}
    if isinstance(spec, (list, tuple)):
        return {"list" if isinstance(spec, list) else "tuple": [_spec_to_config(v) for v in spec]}
    if spec is None:
        return {"none": None}
    raise ValueError(f"Cannot record the input structure {spec!r}.")


def _spec_from_config(data: Any) -> Any:
    if "shape" in data:
        return _Leaf(data["shape"], data["dtype"])
    if "dict" in data:
        return {k: _spec_from_config(v) for k, v in data["dict"]}
    if "list" in data:
        return [_spec_from_config(v) for v in data["list"]]
    if "tuple" in data:
        return tuple(_spec_from_config(v) for v in data["tuple"])
    return None


def _zeros(structs: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)


def _init_without_forward(init: Callable, rng: Any, inputs: Any) -> tuple[Any, Any]:
    """`init(rng, inputs)` computing only the variables, not the forward pass around them.

    An `init` runs the model on its inputs (Flax's `module.init`, Haiku's `init`); the variables
    rarely depend on the input values. Given only the inputs' shapes, Flax's partial evaluation
    computes what depends on the rng and constants, op by op as a plain `init` would (same
    values, same peak memory), and skips the rest. A model whose variables do depend on the
    input values is initialized the plain way, on zeros.
    """
    try:
        return partial_eval.lazy_init(init)(rng, inputs)
    except flax_errors.LazyInitError:
        return init(rng, _zeros(inputs))


def _init_key(seed: int) -> jax.Array:
    # Folded so that it never equals a per-call key drawn from SeedGenerator(seed).
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x1417)


def _make_pure(
    adapter: Adapter, params_def, state_def, owner: str, state_casts, written: dict
) -> Callable:
    """The layer as one pure function of flat variable lists.

    Returns (outputs, new state leaves, summed sown losses); the new state leaves are those in
    `written[training]` once that is known (all of them with `all_state=True`).
    """

    def pure(params, state, rng, inputs, training, all_state=False):
        if rng is not None:
            rng = rng.astype(jnp.uint32)
        state = [x if c is None else x.astype(c) for x, c in zip(state, state_casts, strict=True)]
        outputs, new_state, loss = adapter.apply(
            params_def.unflatten(params), state_def.unflatten(state), rng, inputs, training
        )
        leaves, treedef = jax.tree.flatten(new_state)
        if treedef != state_def:
            raise ValueError(
                f"{owner}: the call returned state with structure {treedef}, but the layer's "
                f"state has structure {state_def}. Return a new state with the same keys as "
                "the state you were given."
            )
        if not all_state and training in written:
            leaves = [leaves[i] for i in written[training]]
        return outputs, leaves, loss

    return pure
