"""The pure program a layer runs: `init` without the forward pass, the per-call function over
flat variable lists, and the abstract and concrete stand-ins of variable values."""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import errors as flax_errors
from flax.core import partial_eval

from flaxlayer import _compat
from flaxlayer._adapter import Adapter
from flaxlayer._variables import TreeLayout

# Models whose variables take at most this many bytes are initialized by one jitted program.
JIT_INIT_BYTES = 64 * 2**20

# Unknown dimensions are probed at two sizes to tell which output dimensions follow them.


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
    state_casts,
    written: dict,
    param_map: Callable[[list], list] | None = None,
    needs_rng: tuple[bool, bool] = (False, False),
) -> Callable:
    """The layer as one pure function of flat variable lists.

    Returns (outputs, new state leaves, summed sown losses); the new state leaves are those in
    `written[training]` once that is known (all of them with `all_state=True`). `param_map`
    turns the stored params into the module's (the parameter transforms: LoRA, int8).
    `rng` may be None in a mode where the module takes a key it does not use (`call_effects`
    tells): it then gets a constant one.
    """

    def pure(params, state, rng, inputs, training, all_state=False):
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
        if not all_state and training in written:
            leaves = [leaves[i] for i in written[training]]
        return outputs, leaves, loss

    return pure


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
        lambda p, s, r, x: pure(p, s, r, x, training, all_state=True), return_shape=True
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
