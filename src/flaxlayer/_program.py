"""The pure program a layer runs: `init` without the forward pass, the per-call function over
flat variable lists, and the abstract and concrete stand-ins of variable values."""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import errors as flax_errors
from flax.core import partial_eval

from flaxlayer import _compat
from flaxlayer._adapter import NEVER, SPEC_KEY, Adapter, PerMode, Plan
from flaxlayer._bridges import compile_for_backend, outside_compiled_graphs
from flaxlayer._outputs import plain_outputs
from flaxlayer._specs import PROBE_SIZES, has_unknown, merge_probes, structs
from flaxlayer._transforms import module_params
from flaxlayer._variables import TreeLayout, is_float_dtype

# Models whose variables take at most this many bytes are initialized by one jitted program.
JIT_INIT_BYTES = 64 * 2**20


def nbytes(trees: Any) -> int:
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(trees)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    )


def zeros(structs: Any) -> Any:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), structs)


def init_without_forward(init: Callable, rng: Any, inputs: Any) -> tuple[Any, Any]:
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
        return init(rng, zeros(inputs))


def init_key(seed: int) -> jax.Array:
    # Folded so that it never equals a per-call key drawn from SeedGenerator(seed).
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0x1417)


def make_pure(
    adapter: Adapter,
    params_layout: TreeLayout,
    state_layout: TreeLayout,
    owner: str,
    state_casts: Sequence[Any],
    param_map: Callable[[list], list] | None = None,
    needs_rng: PerMode = NEVER,
) -> Callable:
    """The layer as one pure function of flat variable lists.

    `pure(params, state, rng, inputs, training, written=None)` returns (outputs as Keras takes
    them, new state leaves, summed sown losses): the new state leaves at the indices
    `written`, or all of them with `written=None`. `param_map` turns the stored params into
    the module's (the parameter transforms: LoRA, int8). `rng` may be None in a mode where the
    module takes a key it does not use (`call_effects` tells): it then gets a constant one.
    """

    def pure(params, state, rng, inputs, training, written=None):
        if param_map is not None:
            params = param_map(params)
        if rng is not None:
            rng = rng.astype(jnp.uint32)
        elif needs_rng[training]:
            rng = jnp.zeros((2,), jnp.uint32)
        state = [x if c is None else x.astype(c) for x, c in zip(state, state_casts, strict=True)]
        outputs, new_state, loss = adapter.apply(
            params_layout.unflatten(params), state_layout.unflatten(state), rng, inputs, training
        )
        leaves = state_layout.variable_leaves(new_state)
        if leaves is None:
            raise ValueError(
                f"{owner}: the call returned state with structure "
                f"{jax.tree.structure(new_state)}, but the layer's state has structure "
                f"{state_layout.treedef}. Return a new state with the same keys as the state "
                "you were given."
            )
        if written is not None:
            leaves = [leaves[i] for i in written]
        return plain_outputs(outputs), leaves, loss

    return pure


class Mode(NamedTuple):
    """How the program runs in one training mode, learned at its first call in that mode."""

    #: The indices of the state leaves a call may change: the only ones returned and written
    #: back (BatchNorm statistics at inference are never copied).
    written: tuple[int, ...]
    #: Whether the call uses its rng key (no key is drawn where it does not).
    rng_used: bool
    #: `run(params, state, rng, inputs, training)` on the backend's tensors.
    run: Callable


class Program:
    """A built layer's compiled program, for one set of variables (a new one after each
    change of them: fine-tuning makes its own).

    Holds the pure function, the abstract arguments it is traced with, and per training mode
    a `Mode`: what it writes is bound into the function the backend compiles, never read
    from state that changes after tracing.
    """

    __slots__ = (
        "_abstract_inputs",
        "_compile",
        "_learn",
        "_modes",
        "has_loss",
        "needs_rng",
        "params",
        "positions",
        "pure",
        "state",
    )

    def __init__(
        self,
        pure: Callable,
        *,
        needs_rng: PerMode,
        has_loss: PerMode,
        abstract_args: tuple[list, list, Any],
        positions: tuple[tuple[int, ...], tuple[int, ...]],
        compile: Callable[[Callable], Callable],
    ):
        self.pure, self.needs_rng, self.has_loss = pure, needs_rng, has_loss
        #: Abstract stored params (float ones in the compute dtype) and state.
        self.params, self.state, self._abstract_inputs = abstract_args
        #: Where the stored params and the state are in the layer's tracked variables.
        self.positions = positions
        self._compile = compile
        self._learn = outside_compiled_graphs(self._effects)
        self._modes: dict[bool, Mode] = {}

    def rng_spec(self, training: bool) -> Any:
        return SPEC_KEY if self.needs_rng[training] else None

    def mode(self, training: bool) -> Mode:
        mode = self._modes.get(training)
        if mode is None:
            written, rng_used = self._learn(training)
            run = self._compile(functools.partial(self.pure, written=written))
            mode = self._modes[training] = Mode(written, rng_used, run)
        return mode

    def _effects(self, training: bool) -> tuple[tuple[int, ...], bool]:
        if not self.state and not self.needs_rng[training]:
            return (), False
        return call_effects(
            self.pure,
            self.params,
            self.state,
            self.rng_spec(training),
            self._abstract_inputs,
            training,
        )

    def output_spec(self, inputs: Any, training: bool) -> Any:
        """The outputs' shapes and dtypes for abstract `inputs` (unknown dimensions as None)."""

        def probe(fill):
            return jax.eval_shape(
                lambda p, s, r, x: self.pure(p, s, r, x, training)[0],
                self.params,
                self.state,
                self.rng_spec(training),
                structs(inputs, fill),
            )

        first = probe(PROBE_SIZES[0])
        second = probe(PROBE_SIZES[1]) if has_unknown(inputs) else first
        return jax.tree.map(merge_probes, first, second)


def abstract_variables(variables: Sequence[Any], cast_to: Any = None) -> list:
    """The variables as ShapeDtypeStructs; float ones in `cast_to` where given (flaxlayer
    autocasts exactly its float params)."""
    return [
        jax.ShapeDtypeStruct(
            tuple(v.shape),
            jnp.dtype(cast_to if cast_to is not None and is_float_dtype(v.dtype) else v.dtype),
        )
        for v in variables
    ]


def abstract(trees: tuple[Any, Any]) -> tuple[Any, Any]:
    """(params, state) with every array leaf as a ShapeDtypeStruct (static leaves kept)."""

    def leaf(x):
        if isinstance(x, (bool, int, float)):
            return jax.ShapeDtypeStruct((), keras.backend.standardize_dtype(type(x)))
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
        return x

    return tuple(jax.tree.map(leaf, tree) for tree in trees)


def concrete(x: Any) -> Any:
    """Zeros for an abstract leaf (what nothing can re-create starts as), else the leaf."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return np.zeros(x.shape, x.dtype)
    return x


def call_effects(
    pure: Callable, params: list, state: list, rng: Any, inputs: Any, training: bool
) -> tuple[tuple[int, ...], bool]:
    """What a call of `pure` in this mode does, from one abstract trace: the indices of the
    state leaves it may change, and whether its results depend on `rng` at all.

    `params`, `state`, `rng` and `inputs` are abstract (ShapeDtypeStructs). A leaf the module
    hands back untouched is its input variable itself in the traced program, or under mixed
    precision that variable cast to the compute dtype (which writing back would only round);
    any other operation on it counts as a change. A module that takes a key but leaves it
    unused in this mode (an NNX Dropout at inference) needs none drawn: drawing one would
    advance the layer's seed, and, under another library's trace (ONNX export), leak a tracer
    into it.
    """
    closed, shapes = jax.make_jaxpr(
        lambda p, s, r, x: pure(p, s, r, x, training), return_shape=True
    )(params, state, rng, inputs)
    state_in = closed.jaxpr.invars[len(params) : len(params) + len(state)]
    first = len(jax.tree.leaves(shapes[0]))
    new_state = closed.jaxpr.outvars[first : first + len(state)]
    cast_of = {
        id(eqn.outvars[0]): eqn.invars[0]
        for eqn in closed.jaxpr.eqns
        if eqn.primitive.name == "convert_element_type"
    }
    written = tuple(
        i
        for i, (out, var) in enumerate(zip(new_state, state_in, strict=True))
        if out is not var and cast_of.get(id(out)) is not var
    )
    rng_used = rng is not None and _compat.inputs_used(closed.jaxpr)[len(params) + len(state)]
    return written, rng_used


def program_for(
    adapter: Adapter,
    store: Any,
    plan: Plan,
    *,
    inputs: Any,
    cast_to: Any,
    tracked: Sequence[Any],
    platforms: Sequence[str] | None,
) -> "Program":
    """The program of a layer's variables (`store`, a `LayerVariables`) for abstract `inputs`.

    `cast_to`: the compute dtype under mixed precision (float params are autocast to it by
    Keras, float state inside the program), else None. `tracked`: the layer's variables in
    Keras's tracking order. `platforms`: the TensorFlow bridge's compile targets.
    """
    needs_rng = plan.needs_rng
    casts = [cast_to if is_float_dtype(v.dtype) else None for v in store.state_vars]
    transforms, count = store.applied(), len(store.param_vars)
    param_map = functools.partial(module_params, applied=transforms, count=count)
    pure = make_pure(
        adapter,
        store.params_layout,
        store.state_layout,
        adapter.owner,
        casts,
        param_map if transforms else None,
        needs_rng,
    )
    params = abstract_variables(store.stored_params, cast_to)
    return Program(
        pure,
        needs_rng=needs_rng,
        has_loss=plan.has_loss,
        abstract_args=(params, abstract_variables(store.state_vars), inputs),
        positions=store.positions(tracked),
        compile=functools.partial(compile_for_backend, owner=adapter.owner, platforms=platforms),
    )
