"""JaxLayer: the engine every flaxlayer layer runs on."""

import contextlib
import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np

from flaxlayer import _compat
from flaxlayer._adapter import NEVER, SPEC_KEY, Adapter, PerMode, Plan
from flaxlayer._bridges import (
    check_backend,
    compile_for_backend,
    eager_input,
    jax_copy,
    outside_compiled_graphs,
    placeholder_for_loading,
)
from flaxlayer._describe import VariableGroup, table_lines
from flaxlayer._distribution import (
    active_distribution,
    backend_sharding,
    current_scope_path,
    variable_layouts,
)
from flaxlayer._finetune import Extra, FineTuning, applied
from flaxlayer._functions import FunctionAdapter
from flaxlayer._program import (
    JIT_INIT_BYTES,
    abstract,
    call_effects,
    concrete,
    init_key,
    init_without_forward,
    make_pure,
    nbytes,
    zeros,
)
from flaxlayer._saving import SerializationError
from flaxlayer._specs import (
    PROBE_SIZES,
    Leaf,
    dtype_name,
    has_unknown,
    merge_probes,
    spec_from_config,
    spec_from_shapes,
    spec_of,
    spec_to_config,
    structs,
)
from flaxlayer._transforms import module_params
from flaxlayer._types import PyTree
from flaxlayer._variables import (
    TreeLayout,
    create_variables,
    flatten_with_paths,
    is_float_dtype,
)

_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# Returned by the eager fast path where Keras's `Layer.__call__` must take the call.
_KERAS_PATH = object()


def _not_built(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("flaxlayer: the layer's program exists once the layer is built.")


class _Core:
    """What a layer holds besides its Keras variables (kept off Keras's attribute tracking)."""

    def __init__(self, adapter: Adapter, initial: Any):
        self.adapter = adapter
        self.initial = initial
        self.input_spec: Any = None
        self.param_vars: list = []
        self.state_vars: list = []
        # Set at build (empty until then).
        self.params_layout = TreeLayout({})
        self.state_layout = TreeLayout({})
        # Loading a file: variables are created without values (`loading`), and take them from
        # the weights file; used before that, they are initialized as a fresh build would be
        # (`pending`). On torch, Keras reads every variable while it builds the model around
        # the layer: they then hold untouched placeholders until the weights come
        # (`placeholders`).
        self.loading = False
        self.pending = False
        self.placeholders = False
        self.build_args: tuple = ()
        self.seed_generator: Any = None
        self.pure: Callable = _not_built
        self.run: Callable = _not_built
        self.needs_rng: PerMode = NEVER
        self.has_loss: PerMode = NEVER
        # Per training mode, learned at the first call in that mode: the indices of the state
        # leaves a call can change (the compiled function returns only those, and only those
        # are written back: BatchNorm statistics at inference are never copied), and whether
        # the call uses its rng key (no key is drawn where it does not).
        self.written: dict[bool, tuple[int, ...]] = {}
        self.rng_used: dict[bool, bool] = {}
        self.learn_effects: Callable[[bool], tuple[tuple[int, ...], bool]] = _not_built
        # Parameter transforms (LoRA, int8) in the order applied, with their variables; and
        # a loaded config's `finetune` entry, replayed once the module's variables exist.
        self.extras: list[Extra] = []
        self.finetune: Any = None
        # Where the stored params and the state are in the layer's tracked variables.
        self.positions: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        # The eager fast path (`JaxLayer.__call__`): the backend's input check, None where the
        # layer always takes Keras's path; the float dtype inputs are cast to, for the dtype
        # policy it was found for (None: that policy needs Keras's path).
        self.eager_input: Callable[[Any, np.dtype], Any] | None = None
        self.eager_policy: Any = None
        self.eager_dtype: np.dtype | None = None

    @property
    def extra_vars(self) -> list:
        return [v for extra in self.extras for v in extra.variables]

    @property
    def stored_params(self) -> list:
        """What the compiled call takes as params: the module's, then the transforms'."""
        return self.param_vars + self.extra_vars

    @property
    def all_vars(self) -> list:
        """Every variable, in the order of the weights file (transforms' last, so that adding
        one never moves another)."""
        return self.param_vars + self.state_vars + self.extra_vars


@keras.saving.register_keras_serializable(package="flaxlayer")
class JaxLayer(FineTuning, keras.layers.Layer):
    """A Keras layer from a pure JAX function: plain JAX, Haiku, or anything `init`/`apply`-shaped.

    `call_fn` takes any of `params`, `state`, `rng`, `inputs`, `training` by those names, in any
    order; the inputs go to `inputs`, or else to the first positional argument that is none of
    the others (as `keras.layers.JaxLayer` passes them). `init_fn` takes any of `rng`, `inputs`,
    `training` and is run at build time on the first inputs' shapes and dtypes (unknown
    dimensions become 1). When `call_fn` takes `state`, it returns `(outputs, new_state)` and
    `init_fn` returns `(params, state)`; the new state is written back to the layer's
    non-trainable variables after each call.

    `params` become trainable Keras variables named `<layer>/params/<path>`, `state` non-trainable
    ones named `<layer>/state/<path>`. `rng` is a fresh `jax.random` key per call, drawn from a
    `keras.random.SeedGenerator(seed)`: reproducible under `keras.utils.set_random_seed`.

    Args:
        call_fn: The forward function.
        init_fn: Creates the initial `params` (and `state`); optional if they are given.
        params: Initial params (any pytree of arrays), used instead of `init_fn`'s.
        state: Initial state (any pytree of arrays), used instead of `init_fn`'s.
        seed: Seed for the keys passed as `rng` (and to `init_fn`).
        native_serialization_platforms: Platforms (`"cpu"`, `"cuda"`, `"rocm"`, `"tpu"`) the
            TensorFlow backend's conversion (jax2tf) and SavedModel export compile for;
            default: the platform this process runs on.
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
        call_fn: Callable[..., Any],
        init_fn: Callable[..., Any] | None = None,
        params: PyTree | None = None,
        state: PyTree | None = None,
        seed: int | None = None,
        native_serialization_platforms: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.call_fn: Callable[..., Any] | None = call_fn
        self.init_fn: Callable[..., Any] | None = init_fn
        adapter = FunctionAdapter(
            call_fn,
            init_fn,
            has_params=params is not None,
            has_state=state is not None,
            owner=self._owner_name(),
        )
        initial = None if params is None and state is None else (params, state)
        self._setup(adapter, initial, seed, native_serialization_platforms, kwargs)

    def _owner_name(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    def _setup(
        self, adapter: Adapter, initial: Any, seed: int | None, platforms: Any, kwargs: dict
    ) -> None:
        owner = self._owner_name()
        check_backend(owner)
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):
            raise ValueError(f"{owner}: `seed` must be None or an int in [0, 2**32); got {seed!r}.")
        self.seed = seed
        if platforms is not None and (
            isinstance(platforms, str) or not set(platforms) <= set(_PLATFORMS) or not platforms
        ):
            raise ValueError(
                f"{owner}: `native_serialization_platforms` must be a non-empty sequence of "
                f"{', '.join(repr(p) for p in _PLATFORMS)}; got {platforms!r}."
            )
        self.native_serialization_platforms = None if platforms is None else tuple(platforms)
        seed_generator = keras.random.SeedGenerator(seed)
        # The init key comes from Python, not from the generator's state: a build may run inside
        # a TensorFlow graph or a torch meta trace, where that state has no value.
        self._init_seed = seed if seed is not None else random.randint(1, 10**9)
        self._policy_given = kwargs.get("dtype") is not None or (
            keras.config.dtype_policy().name != "float32"
        )
        self._core = _Core(adapter, initial)
        # Tracked (saved, counted in `non_trainable_variables`) only once a build shows that
        # the model draws keys: created here, outside any graph a build may run in.
        self._core.seed_generator = seed_generator

    # ----------------------------------------------------------------------------------- build

    def __call__(self, *args, **kwargs):
        if (
            self._core.eager_input is not None
            and len(args) == 1
            and (not kwargs or kwargs.keys() == {"training"})
        ):
            outputs = self._eager_call(args[0], kwargs.get("training"))
            if outputs is not _KERAS_PATH:
                return outputs
        if not self.built:
            inputs = args[0] if args else kwargs.get("inputs")
            self._core.input_spec = spec_of(inputs, self.compute_dtype)
        return super().__call__(*args, **kwargs)

    def _eager_call(self, x: Any, training: Any) -> Any:
        """`layer(x)` on one concrete array, outside any Keras call, scope or trace: the
        compiled program runs with only what Keras's `Layer.__call__` would do for this call
        (cast a float `x` to the input dtype, clear the previous call's losses, resolve
        `training`: given, else False). Returns `_KERAS_PATH` where anything more is needed
        (a mask, a scope, an enclosing layer's call, mixed precision, a layer still loading,
        an activity regularizer or input spec): `Layer.__call__` then takes the call."""
        core = self._core
        if core.loading or core.pending or core.placeholders:
            return _KERAS_PATH
        if self.activity_regularizer is not None or self.input_spec is not None:
            return _KERAS_PATH
        policy = self.dtype_policy
        if policy is not core.eager_policy:
            core.eager_policy, core.eager_dtype = policy, self._plain_input_dtype()
        if core.eager_dtype is None or not self.autocast or not _compat.keras_call_is_plain(x):
            return _KERAS_PATH
        inputs = core.eager_input(x, core.eager_dtype)
        if inputs is None:
            return _KERAS_PATH
        if not getattr(self, "_called", False):  # Keras's tracked __setattr__ is slow
            self._called = True
        if self._losses:
            self._clear_losses()
        state_vars = core.state_vars
        return self._apply(
            inputs,
            bool(training),
            _compat.variable_values(core.stored_params),
            state_vars,
            _compat.variable_values(state_vars),
        )

    def _plain_input_dtype(self) -> np.dtype | None:
        """The dtype float inputs are cast to, where the layer's dtype policy is one dtype for
        computing and storing (no autocast scope); None otherwise."""
        if isinstance(self.dtype_policy, keras.dtype_policies.DTypePolicyMap):
            return None
        if self.compute_dtype != self.variable_dtype:
            return None
        return np.dtype(jnp.dtype(self.input_dtype))

    def build(self, input_shape=None):
        if not self._core.loading:
            return self._build(input_shape)
        try:
            return self._build(input_shape)
        except SerializationError:
            raise
        except Exception as e:  # the module a file configured cannot be built
            raise SerializationError(
                f"{self._owner_name()}: the module configured by the file cannot be built: "
                f"{type(e).__name__}: {e}. The file configures: {self._core.adapter.summary()}"
            ) from e

    def _build(self, input_shape=None):
        core, adapter = self._core, self._core.adapter
        spec = core.input_spec
        if spec is None:
            if input_shape is None:
                raise ValueError(
                    f"{self._owner_name()}: build() needs the input shape, e.g. "
                    "layer.build((None, 28, 28, 1)); or call the layer on inputs."
                )
            spec = spec_from_shapes(input_shape, self.compute_dtype)
        core.input_spec = spec
        inputs = structs(spec, 1)
        # Keras may build inside its own symbolic trace (a subclassed model first seen by fit):
        # initial values must still be concrete there. Only there: op-by-op evaluation of the
        # initializers costs time and memory.
        evaluated_now = (
            jax.ensure_compile_time_eval if _compat.in_stateless_scope() else contextlib.nullcontext
        )
        with evaluated_now():
            plan = adapter.plan(inputs)
            layouts = self._plan_layouts(plan)
            core.build_args = (plan, inputs, layouts)
            if core.loading:
                # Nothing sized by the file's config is allocated: the variables are created
                # without values and take them from the weights file (`load_own_variables`).
                trees = abstract(core.initial if core.initial is not None else plan.trees)
            else:
                trees = self._initial_trees()
        given = core.initial is not None
        if not core.loading:
            core.initial = None  # the variables below now own these values
        core.params_layout, core.state_layout = TreeLayout(trees[0]), TreeLayout(trees[1])
        del trees
        if core.loading:
            with keras.StatelessScope(initialize_variables=False):
                self._create_variables(layouts, copy=False, pending=True)
            _compat.forget_uninitialized(core.param_vars + core.state_vars)
            core.pending = True
        else:
            self._create_variables(layouts, copy=given, pending=False)
        if core.finetune is not None:
            finetune, core.finetune = core.finetune, None
            self._replay_finetune(finetune)
        core.needs_rng, core.has_loss = plan.needs_rng, plan.has_loss
        if any(core.needs_rng):
            self.seed_generator = core.seed_generator
        self._compile_program()

    def _compile_program(self) -> None:
        """The layer's pure function and its compiled form, for its current variables."""
        core = self._core
        mixed = self.autocast and self.compute_dtype != self.variable_dtype
        state_casts = [
            self.compute_dtype if mixed and is_float_dtype(v.dtype) else None
            for v in core.state_vars
        ]
        transforms = applied(core.extras, len(core.param_vars))
        where = {id(v): i for i, v in enumerate(_compat.tracked_variables(self))}
        core.positions = (
            tuple(where[id(v)] for v in core.stored_params),
            tuple(where[id(v)] for v in core.state_vars),
        )
        core.written, core.rng_used = {}, {}
        core.pure = make_pure(
            core.adapter,
            core.params_layout,
            core.state_layout,
            self._owner_name(),
            state_casts,
            core.written,
            param_map=functools.partial(
                module_params, applied=transforms, count=len(core.param_vars)
            )
            if transforms
            else None,
            needs_rng=core.needs_rng,
        )
        core.run = compile_for_backend(
            core.pure, owner=self._owner_name(), platforms=self.native_serialization_platforms
        )
        core.learn_effects = outside_compiled_graphs(self._call_effects)
        # A subclass's own `call`, or Keras's NNX mode (variables handed in by `nnx.jit`),
        # always goes through Keras's `Layer.__call__`.
        plain = type(self).call is JaxLayer.call and not keras.config.is_nnx_enabled()
        core.eager_input = eager_input() if plain else None
        core.eager_policy = None

    def _initial_trees(self) -> tuple[Any, Any]:
        """The (params, state) a fresh build starts from: given values or the model's init."""
        core, adapter = self._core, self._core.adapter
        plan, inputs, layouts = core.build_args
        expected = plan.trees
        if core.initial is not None:
            return adapter.given(core.initial, plan, inputs)
        if expected is None:
            return {}, {}
        if not adapter.init_uses_rng:  # the values exist already (an NNX module)
            return adapter.init(None, inputs)
        rng = init_key(self._init_seed)
        if layouts:
            # Each leaf is created already sharded, never whole on one device.
            init = jax.jit(adapter.init, out_shardings=_sharding_trees(expected, layouts, adapter))
            return init(rng, zeros(inputs))
        if nbytes(expected) <= JIT_INIT_BYTES:
            # One compiled program (XLA drops the forward pass) builds a small model about
            # twice as fast as op-by-op evaluation; a large one is built op by op, which keeps
            # the peak near the parameters' size.
            try:
                return jax.jit(lambda key: init_without_forward(adapter.init, key, inputs))(rng)
            except jax.errors.ConcretizationTypeError:
                pass  # an init that branches on values runs op by op
        return init_without_forward(adapter.init, rng, inputs)

    def _create_variables(self, layouts: dict | None, *, copy: bool, pending: bool) -> None:
        core, adapter = self._core, self._core.adapter
        owner = self._owner_name()
        layout_for = layouts.get if layouts else None
        created: list[list[keras.Variable]] = []
        for layout, prefix, trainable in (
            (core.params_layout, adapter.params_prefix, True),
            (core.state_layout, adapter.state_prefix, False),
        ):
            offset = sum(len(group) for group in created)
            created.append(
                create_variables(
                    layout.take_leaves(),
                    layout.paths,
                    owner=owner,
                    prefix=prefix,
                    trainable=trainable,
                    dtype_for=self._variable_dtype_for,
                    copy=copy,  # the caller keeps what it passed; what init made is moved
                    layout_for=layout_for,
                    pending=functools.partial(self._first_value_at, offset) if pending else None,
                )
            )
        core.param_vars, core.state_vars = created
        for variable in core.param_vars + core.state_vars:
            self._track_variable(variable)

    def _first_value_at(self, offset: int, index: int) -> Callable:
        return self._first_value(offset + index)

    def _first_value(self, index: int) -> Callable:
        """The initializer of deferred variable `index`: a value for Keras to read early."""

        def initializer(shape, dtype):
            core = self._core
            variables = core.all_vars
            if core.pending:
                # Inside Keras's deserialization (a weights file usually follows): no values yet.
                loading = core.loading and _compat.keras_safe_mode() is not None
                placeholder = placeholder_for_loading() if loading else None
                if placeholder is not None:
                    for v in variables:
                        if _compat.is_deferred(v):
                            _compat.initialize_deferred(v, placeholder(v.shape, v.dtype))
                    core.placeholders = True
                    core.pending = False
                else:
                    self._materialize()
            return variables[index].value

        return initializer

    def _materialize(self) -> None:
        """Gives the variables of a layer loaded without weights their initial values.

        Used before any weights were loaded into it, a layer built from a config starts as a
        fresh build would: the module's init, or zeros where nothing can re-create the values
        (an NNX module or a JaxLayer without init_fn rebuilt from a config).
        """
        core = self._core
        core.loading = False
        params, state = self._initial_trees()
        params = [concrete(x) for x in TreeLayout(params).take_leaves()]
        extras = self._stored_from_module(params)
        values = params + [concrete(x) for x in TreeLayout(state).take_leaves()] + extras
        for variable, value in zip(core.all_vars, values, strict=True):
            if _compat.is_deferred(variable):
                _compat.initialize_deferred(variable, value)
            else:
                variable.assign(value)
        core.pending = core.placeholders = False

    def _plan_layouts(self, plan: Plan) -> dict | None:
        """{variable path parts: TensorLayout} under a keras.distribution, else None."""
        distribution = active_distribution()
        expected = plan.trees
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
        specs = {"/".join(base + k): v for k, v in plan.partition_specs.items()}
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
        if core.placeholders:  # loaded from a config and used before any weights were loaded
            self._materialize()
        # The variables as the layer tracks them now: in Keras's NNX mode, `nnx.jit` and
        # `nnx.grad` hand the layer new Variable objects in the same places.
        tracked = _compat.tracked_variables(self)
        params_at, state_at = core.positions
        state_vars = [tracked[i] for i in state_at]
        return self._apply(
            inputs,
            bool(training),
            [tracked[i].value for i in params_at],
            state_vars,
            [v.value for v in state_vars],
        )

    def _apply(
        self, inputs: Any, training: bool, params: list, state_vars: list, state: list
    ) -> Any:
        """One call of the compiled program on these values; writes back the state it changes
        and adds the losses the module sows."""
        core = self._core
        written = core.written.get(training)
        if written is None:
            written, core.rng_used[training] = core.learn_effects(training)
            core.written[training] = written
        rng = core.seed_generator.next() if core.rng_used[training] else None
        outputs, new_state, loss = core.run(params, state, rng, inputs, training=training)
        for index, value in zip(written, new_state, strict=True):
            state_vars[index].assign(value)
        if core.has_loss[training]:
            self.add_loss(loss)
        return outputs

    def _abstract_arguments(self, training: bool) -> tuple:
        core = self._core
        cast = self.autocast and self.compute_dtype != self.variable_dtype
        params = [self._struct_of(v, cast) for v in core.stored_params]
        state = [self._struct_of(v, False) for v in core.state_vars]  # pure() casts state
        rng = SPEC_KEY if core.needs_rng[training] else None
        return params, state, rng

    def _call_effects(self, training: bool) -> tuple[tuple[int, ...], bool]:
        core = self._core
        if not core.state_vars and not core.needs_rng[training]:
            return (), False
        params, state, rng = self._abstract_arguments(training)
        return call_effects(core.pure, params, state, rng, structs(core.input_spec, 1), training)

    def compute_output_spec(self, inputs, training=None):
        if not self._core.loading:
            return self._output_spec(inputs, training)
        try:
            return self._output_spec(inputs, training)
        except Exception as e:  # the module a file configured does not apply to its inputs
            raise SerializationError(
                f"{self._owner_name()}: the module configured by the file cannot be applied to "
                f"inputs {jax.tree.map(lambda t: tuple(t.shape), inputs)}: "
                f"{type(e).__name__}: {e}. The file configures: {self._core.adapter.summary()}"
            ) from e

    def _output_spec(self, inputs, training=None):
        core = self._core
        training = bool(training)
        spec = spec_of(inputs, self.compute_dtype)
        params, state, rng = self._abstract_arguments(training)

        def probe(fill):
            return jax.eval_shape(
                lambda p, s, r, x: core.pure(p, s, r, x, training)[0],
                params,
                state,
                rng,
                structs(spec, fill),
            )

        first = probe(PROBE_SIZES[0])
        second = probe(PROBE_SIZES[1]) if has_unknown(spec) else first
        return jax.tree.map(merge_probes, first, second)

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
            native_serialization_platforms=(
                None
                if self.native_serialization_platforms is None
                else list(self.native_serialization_platforms)
            ),
        )
        finetune = self._finetune_config() if self.built else None
        if finetune is not None:
            config["finetune"] = finetune
        if self.init_fn is None and isinstance(self._core.adapter, FunctionAdapter):
            # Nothing can re-create the params: record their shapes, the weights file the values.
            params, state = self._trees_for_config()
            config.update(
                params=spec_to_config(params, self._owner_name(), "params"),
                state=spec_to_config(state, self._owner_name(), "state"),
            )
        return config

    def _trees_for_config(self) -> tuple[Any, Any]:
        core = self._core
        if not self.built:
            trees = core.initial or (None, None)
            return tuple(  # type: ignore[return-value]
                None
                if tree is None
                else jax.tree.map(
                    lambda x: Leaf(np.shape(x), dtype_name(x)) if hasattr(x, "dtype") else x, tree
                )
                for tree in trees
            )
        # From the variables themselves, never mapped over as pytrees (in Keras's NNX mode a
        # variable is a pytree node).
        params = [  # as the module sees them: an int8 kernel is a float param
            Leaf(tuple(v.shape), self._module_dtype(i)) for i, v in enumerate(core.param_vars)
        ]
        state = [Leaf(tuple(v.shape), dtype_name(v)) for v in core.state_vars]
        return core.params_layout.unflatten(params), core.state_layout.unflatten(state)

    @classmethod
    def from_config(cls, config: dict) -> "JaxLayer":
        config = dict(config)
        owner = f"{cls.__name__} {config.get('name')!r}"
        finetune = config.pop("finetune", None)
        for name in ("call_fn", "init_fn"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(config[name])
        for name in ("params", "state"):
            if config.get(name) is not None:
                # Abstract: nothing sized by the config is allocated (the weights file holds
                # the values, checked against these shapes).
                config[name] = jax.tree.map(
                    lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype),
                    spec_from_config(config[name], owner, (name,), abstract=True),
                    is_leaf=lambda x: isinstance(x, Leaf),
                )
        try:
            layer = cls(**config)
        except (TypeError, ValueError) as e:
            raise SerializationError(f"{owner}: cannot rebuild the layer from the file: {e}") from e
        layer._core.loading = True
        layer._core.finetune = finetune
        return layer

    def get_build_config(self) -> dict | None:
        if self._core.input_spec is None:
            return None
        return {"input_spec": spec_to_config(self._core.input_spec, self._owner_name(), "input")}

    def build_from_config(self, config: dict) -> None:
        if config and "input_spec" in config:
            self._core.input_spec = spec_from_config(
                config["input_spec"], self._owner_name(), ("build_config", "input_spec")
            )
            self.build(None)
        else:
            super().build_from_config(config)

    def save_own_variables(self, store) -> None:
        for i, variable in enumerate(self._core.all_vars):
            store[str(i)] = variable

    def load_own_variables(self, store) -> None:
        core = self._core
        variables = core.all_vars
        owner = self._owner_name()
        if len(store.keys()) != len(variables):
            raise SerializationError(
                f"{owner}: the weights file holds {len(store.keys())} variables for this layer, "
                f"but the layer has {len(variables)}. The file was saved from a different "
                "model or module configuration."
            )
        values = [store[str(i)] for i in range(len(variables))]
        problems = [
            f"{v.path}: the file stores shape {tuple(value.shape)}, the configured layer has "
            f"{tuple(v.shape)}"
            for v, value in zip(variables, values, strict=True)
            if tuple(value.shape) != tuple(v.shape)
        ]
        if problems:
            raise SerializationError(
                f"{owner}: the weights file does not match the module:\n  "
                + "\n  ".join(problems)
                + "\nNo weight was loaded. Load a file saved from this module configuration."
            )
        self._fill(variables, values)

    def set_weights(self, weights) -> None:
        """As `keras.layers.Layer.set_weights`; on a layer rebuilt from a config (not loaded
        from a file), the values also become the first values of its deferred variables."""
        core = self._core
        if not (core.pending or core.placeholders):
            return super().set_weights(weights)
        variables = self.weights
        if len(weights) != len(variables):
            raise ValueError(
                f"{self._owner_name()}: set_weights got {len(weights)} arrays for "
                f"{len(variables)} weights."
            )
        for variable, value in zip(variables, weights, strict=True):
            if tuple(np.shape(value)) != tuple(variable.shape):
                raise ValueError(
                    f"{self._owner_name()}: set_weights got shape {np.shape(value)} for "
                    f"{variable.path}, whose shape is {tuple(variable.shape)}."
                )
        self._fill(variables, weights)

    def _fill(self, variables: list, values: Sequence) -> None:
        """Gives every variable its value (first values for deferred ones): the layer is then
        built like any other, out of loading mode."""
        for variable, value in zip(variables, values, strict=True):
            if _compat.is_deferred(variable):
                _compat.initialize_deferred(variable, np.asarray(value, variable.dtype))
            else:
                variable.assign(value)
        core = self._core
        core.loading = core.pending = core.placeholders = False
        core.initial = None

    # ------------------------------------------------------------------------------ the trees

    @property
    def params(self) -> PyTree:
        """The trainable variables as a pytree mirroring the params tree.

        Before build, the `params` the layer was given (as `keras.layers.JaxLayer` shows them).
        """
        return self._tree("params", 0)

    @property
    def state(self) -> PyTree:
        """The non-trainable variables as a pytree mirroring the state tree.

        Before build, the `state` the layer was given (as `keras.layers.JaxLayer` shows them).
        """
        return self._tree("state", 1)

    def _tree(self, what: str, index: int) -> Any:
        core = self._core
        if _compat.called_by_keras_saving_walk():
            return None
        if not self.built:
            if core.initial is not None and isinstance(core.initial, tuple):
                return core.initial[index]
            self._check_built(what)
        layout = core.params_layout if index == 0 else core.state_layout
        return layout.unflatten(core.param_vars if index == 0 else core.state_vars)

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
        if not self.built:
            raise ValueError(
                f"{self._owner_name()} is not built yet, so it has no variables to describe. "
                "Build it first: call it once on inputs (`layer(x)`), call "
                "`layer.build(input_shape)` (e.g. `layer.build((None, 8, 8, 1))`), or build or "
                "call the model that holds it."
            )
        core, adapter = self._core, self._core.adapter
        what = adapter.model_name()
        groups = (
            VariableGroup(adapter.params_prefix, core.params_layout.paths, core.param_vars),
            VariableGroup(adapter.state_prefix, core.state_layout.paths, core.state_vars),
            VariableGroup((), self._extra_paths(), core.extra_vars),
        )
        title = self._owner_name() + (f" ({what})" if what else "")
        print_fn = print if print_fn is None else print_fn
        for line in table_lines(title, groups, {id(v) for v in self.trainable_weights}):
            print_fn(line)

    def _values(self) -> tuple[Any, Any]:
        """Copies of the current values as JAX arrays: snapshots the caller may keep.

        Not views: Keras's JAX trainer donates the variables' buffers to each compiled step, so
        an array shared with a variable is deleted by the next `fit`, `evaluate` or `predict`.
        """
        core = self._core
        stored = [jax_copy(v.value) for v in core.stored_params]
        state = [jax_copy(v.value) for v in core.state_vars]
        n = len(core.param_vars)
        params = module_params(stored, applied(core.extras, n), n)
        return core.params_layout.unflatten(params), core.state_layout.unflatten(state)

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
