"""JaxLayer: the Keras face of the engine every flaxlayer layer runs on.

The layer holds typed parts, each owned by one module: its construction `Settings`
(`_layer_config`), its `Lifecycle` phase (`_lifecycle`), its `LayerVariables` (`_store`, made
by `_build` and changed by `_finetune`), its compiled `Program` (`_program`) and its
`EagerPath` (`_fast_path`). The methods below read top-down in Keras's lifecycle order.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras

from flaxlayer import _build, _compat, _file_format, _layer_config, _loading
from flaxlayer._adapter import Adapter
from flaxlayer._bridges import check_backend, eager_input
from flaxlayer._fast_path import EagerPath
from flaxlayer._finetune_config import finetune_config, replay_finetune
from flaxlayer._finetune_methods import FineTuningMethods
from flaxlayer._functions import FunctionAdapter
from flaxlayer._lifecycle import Lifecycle, Phase
from flaxlayer._program import Program, program_for
from flaxlayer._specs import check_recorded, spec_from_shapes, spec_of, structs
from flaxlayer._store import LayerVariables, VariableFactory
from flaxlayer._types import PyTree
from flaxlayer._views import ViewMethods


@keras.saving.register_keras_serializable(package="flaxlayer")
class JaxLayer(FineTuningMethods, ViewMethods, keras.layers.Layer):
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

    _FILE_ENTRIES = ("JaxLayer", _file_format.JAX_LAYER)

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
        given = None if params is None and state is None else (params, state)
        has = {"has_params": params is not None, "has_state": state is not None}
        make = lambda owner: FunctionAdapter(call_fn, init_fn, owner=owner, **has)  # noqa: E731
        self._construct(make, given, seed, native_serialization_platforms, kwargs)
        self.call_fn: Callable[..., Any] | None = call_fn
        self.init_fn: Callable[..., Any] | None = init_fn

    def _construct(self, make_adapter, given, seed, platforms, kwargs: dict) -> None:
        """The one construction path of every flaxlayer layer: Keras's, then the engine's."""
        keras.layers.Layer.__init__(self, **kwargs)
        owner = self._owner_name()
        self._adapter: Adapter = make_adapter(owner)
        check_backend(owner)
        self._settings = _layer_config.settings(owner, seed, platforms, kwargs.get("dtype"))
        self._blueprint = _build.Blueprint(given=given)
        self._lifecycle = Lifecycle()
        self._store: LayerVariables | None = None
        self._program: Program | None = None
        self._eager: EagerPath | None = None
        self._build_inputs: _build.BuildInputs | None = None

    def _owner_name(self) -> str:
        return f"{type(self).__name__} {self.name!r}"

    @property
    def seed(self) -> int | None:
        return self._settings.seed

    @property
    def native_serialization_platforms(self) -> tuple[str, ...] | None:
        return self._settings.platforms

    # ------------------------------------------------------------------------------- calling

    def __call__(self, *args, **kwargs):
        eager = self._eager
        if eager is not None and len(args) == 1 and (not kwargs or kwargs.keys() == {"training"}):
            inputs = eager.inputs(self, args[0]) if self._lifecycle.has_values else None
            if inputs is not None:
                _compat.start_plain_call(self)
                params, state_vars = eager.store.stored_params, eager.store.state_vars
                params, state = _compat.variable_values(params), _compat.variable_values(state_vars)
                return self._run_program(
                    inputs, bool(kwargs.get("training")), params, state_vars, state
                )
        if not self.built:
            inputs = args[0] if args else kwargs.get("inputs")
            self._blueprint = self._blueprint.but(inputs_spec=spec_of(inputs, self.compute_dtype))
        return super().__call__(*args, **kwargs)

    def build(self, input_shape=None):
        with self._file_errors("cannot be built", Phase.CONFIGURED):
            spec = self._blueprint.inputs_spec
            if spec is None and input_shape is None:
                raise ValueError(
                    f"{self._owner_name()}: build() needs the input shape, e.g. "
                    "layer.build((None, 28, 28, 1)); or call the layer on inputs."
                )
            if spec is None:
                spec = spec_from_shapes(input_shape, self.compute_dtype)
            self._blueprint = self._blueprint.but(inputs_spec=spec)
            self._build(structs(spec, 1))

    def _build(self, inputs: Any) -> None:
        from_file = self._lifecycle.phase is Phase.CONFIGURED
        blueprint, seed = self._blueprint, self._settings.init_seed
        given, owner = blueprint.given, self._owner_name()
        build, trees = _build.start(self._adapter, given, inputs, seed, owner, from_file)
        self._blueprint = blueprint.but(given=None, finetune=None)  # the build took them over
        self._build_inputs = build
        self._store = store = LayerVariables.from_trees(trees, self._adapter, build.layouts)
        del trees  # the variables own these values: the build keeps no other reference
        first_value = self._first_value if from_file else None
        copy = given is not None and not from_file
        factory = self._factory()
        dtype_for = functools.partial(self._settings.stored_dtype, self.variable_dtype)
        _build.create_module_variables(factory, store, dtype_for, copy, first_value)
        if from_file:
            self._lifecycle.move_to(Phase.DEFERRED)
        if blueprint.finetune is not None:
            replay_finetune(store, factory, blueprint.finetune, first_value)
        if any(build.plan.needs_rng):
            self.seed_generator = self._settings.seed_generator
        self._compile()

    def _compile(self) -> None:
        """A new program for the current variables (at build, and after fine-tuning)."""
        store, build = self._store, self._build_inputs
        assert store is not None and build is not None
        mixed = self.autocast and self.compute_dtype != self.variable_dtype
        self._program = program_for(
            self._adapter,
            store,
            build.plan,
            inputs=structs(self._blueprint.inputs_spec, 1),
            cast_to=self.compute_dtype if mixed else None,
            tracked=_compat.tracked_variables(self),
            platforms=self._settings.platforms,
        )
        # A subclass's own `call`, or Keras's NNX mode (variables handed in by `nnx.jit`),
        # always goes through Keras's `Layer.__call__`.
        plain = type(self).call is JaxLayer.call and not keras.config.is_nnx_enabled()
        self._eager = EagerPath(eager_input(), store) if plain else None

    def _factory(self) -> VariableFactory:
        return VariableFactory(self)

    def call(self, inputs, training=None):
        if self._lifecycle.phase is Phase.PLACEHOLDERS:  # used before any weights came
            self._materialize()
        program = self._program
        assert program is not None, "Keras builds a layer before calling it"
        # The variables as the layer tracks them now: in Keras's NNX mode, `nnx.jit` and
        # `nnx.grad` hand the layer new Variable objects in the same places.
        tracked = _compat.tracked_variables(self)
        params_at, state_at = program.positions
        state_vars = [tracked[i] for i in state_at]
        params = [tracked[i].value for i in params_at]
        return self._run_program(
            inputs, bool(training), params, state_vars, [v.value for v in state_vars]
        )

    def _run_program(
        self, inputs: Any, training: bool, params: list, state_vars: list, state: list
    ):
        """One call of the compiled program on these values; writes back the state it changes
        and adds the losses the module sows."""
        program = self._program
        assert program is not None, "Keras builds a layer before calling it"
        mode = program.mode(training)
        rng = self._settings.seed_generator.next() if mode.rng_used else None
        outputs, new_state, loss = mode.run(params, state, rng, inputs, training=training)
        for index, value in zip(mode.written, new_state, strict=True):
            state_vars[index].assign(value)
        if program.has_loss[training]:
            self.add_loss(loss)
        return outputs

    def compute_output_spec(self, inputs, training=None):
        with self._file_errors(
            f"cannot be applied to inputs {jax.tree.map(lambda t: tuple(t.shape), inputs)}"
        ):
            assert self._program is not None
            spec = spec_of(inputs, self.compute_dtype)
            if self._lifecycle.from_file:
                check_recorded(self._blueprint.inputs_spec, spec, self._owner_name())
            return self._program.output_spec(spec, bool(training))

    def _file_errors(self, what: str, *phases: Phase) -> Any:
        """While the layer comes from a file (in `phases`, default: until it has values), an
        error of the module the file configured is a SerializationError."""
        lifecycle = self._lifecycle
        applies = lifecycle.phase in phases if phases else lifecycle.from_file
        return _loading.file_errors(self._owner_name(), self._adapter, what, applies)

    # -------------------------------------------------------------------------------- config

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(_layer_config.settings_config(self._settings))
        finetune = finetune_config(self._store) if self._store is not None else None
        if finetune is not None:
            config["finetune"] = finetune
        config.update(self._model_config())
        return {**config, "format": _file_format.format_entry()}

    def _model_config(self) -> dict:
        """The entries of what the layer wraps (FlaxLayer: the module and method); without an
        init_fn, the shapes of params and state (the weights file holds their values)."""
        store, shapes = self._store, None
        if self.init_fn is None:  # an int8 kernel as the float param the module sees
            given = self._blueprint.given
            shapes = store.shapes() if store else _layer_config.given_shapes(given)
        return _layer_config.functions_config(self, shapes)

    @classmethod
    def from_config(cls, config: dict) -> "JaxLayer":
        config = _file_format.checked(config, cls, *cls._FILE_ENTRIES)
        owner = _layer_config.owner_of(cls, config)
        finetune = config.pop("finetune", None)
        layer = _layer_config.rebuild(cls, cls._model_from_config(config, owner), owner)
        layer._lifecycle.move_to(Phase.CONFIGURED)
        layer._blueprint = layer._blueprint.but(finetune=finetune)
        return layer

    @classmethod
    def _model_from_config(cls, config: dict, owner: str) -> dict:
        """The constructor arguments of `_model_config`'s entries, read from a file."""
        return _layer_config.functions_from_config(config, owner)

    def get_build_config(self) -> dict | None:
        return _layer_config.build_config(self._blueprint.inputs_spec, self._owner_name())

    def build_from_config(self, config: dict) -> None:
        spec = _layer_config.recorded_inputs(config, self._owner_name(), self._lifecycle.from_file)
        if spec is None:
            return super().build_from_config(config)
        self._blueprint = self._blueprint.but(inputs_spec=spec)
        self.build(None)

    # ------------------------------------------------------------------------------- weights

    def save_own_variables(self, store) -> None:
        assert self._store is not None
        for i, variable in enumerate(self._store.all_vars):
            store[str(i)] = variable

    def load_own_variables(self, store) -> None:
        assert self._store is not None
        variables = self._store.all_vars
        values = _loading.checked_file_values(self._owner_name(), variables, store)
        self._fill(variables, values)

    def set_weights(self, weights) -> None:
        """As `keras.layers.Layer.set_weights`; on a layer rebuilt from a config (not loaded
        from a file), the values also become the first values of its deferred variables."""
        if not self._lifecycle.awaits_values:
            return super().set_weights(weights)
        _loading.check_given_values(self._owner_name(), self.weights, weights)
        self._fill(self.weights, weights)

    def _fill(self, variables: list, values: Sequence) -> None:
        """Gives every variable its value (first values for deferred ones)."""
        _loading.fill(variables, values)
        if self._lifecycle.awaits_values:
            self._lifecycle.move_to(Phase.FILLED)

    def _first_value(self, index: int) -> Callable:
        """The initializer of deferred variable `index` (see `_loading.deferred_initializer`)."""
        assert self._store is not None
        at = (self._owner_name(), self._lifecycle, self._store)
        return _loading.deferred_initializer(*at, index, self._materialize)

    def _materialize(self) -> None:
        """Gives a layer from a file, used before any weights came, its initial values."""
        assert self._store is not None and self._build_inputs is not None
        _loading.materialize(self._lifecycle, self._adapter, self._build_inputs, self._store)

    def _built_variables(self, what: str) -> LayerVariables:
        """The variables fine-tuning method `what` changes; a ValueError before build."""
        if self._store is None:
            raise ValueError(
                f"{self._owner_name()}: {what} needs a built layer (its variables exist once it "
                "is built). Call the layer on inputs, or layer.build(input_shape), first."
            )
        return self._store
