"""The TensorFlow backend: the pure function converted with jax2tf, once per input signature.

Unknown dimensions become symbolic (shape polymorphism): the leading dimension of every input
shares the symbol "batch", any other unknown dimension gets its own. Gradients flow through
jax2tf's custom gradient (a `jax.vjp` of the same function).

Eager calls (outside `tf.function`) run the converted function through a `tf.function` cached
per signature: a converted function called eagerly exports the JAX function again every time.
"""

from collections.abc import Callable

import jax
import tensorflow as tf
from jax.experimental import jax2tf


def _poly_shape(leaf_index: int, shape) -> str | None:
    dims = list(shape)
    if all(d is not None for d in dims):
        return None
    names = [
        str(d) if d is not None else ("batch" if axis == 0 else f"d{leaf_index}_{axis}")
        for axis, d in enumerate(dims)
    ]
    return "(" + ", ".join(names) + (",)" if len(names) == 1 else ")")


def _signature(inputs) -> tuple:
    leaves, treedef = jax.tree.flatten(inputs)
    return treedef, tuple((tuple(x.shape.as_list()), x.dtype.name) for x in leaves)


def _convert(pure: Callable, training: bool, x_def, x_leaves) -> tuple[Callable, Callable]:
    """(in-graph, eager) versions of the function for one input signature."""
    poly_x = x_def.unflatten([_poly_shape(i, shape) for i, (shape, _) in enumerate(x_leaves)])
    converted = jax2tf.convert(
        lambda p, s, r, x: pure(p, s, r, x, training),
        polymorphic_shapes=[None, None, None, poly_x],
        with_gradient=True,
    )
    return converted, tf.function(converted, autograph=False)


def compile_tensorflow(pure: Callable) -> Callable:
    converted: dict = {}

    @tf.autograph.experimental.do_not_convert
    def run(params, state, rng, inputs, training):
        inputs = jax.tree.map(tf.convert_to_tensor, inputs)
        if rng is not None:
            rng = tf.cast(rng, tf.int32)
        treedef, signature = _signature(inputs)
        key = (training, rng is not None, treedef, signature)
        fns = converted.get(key)
        if fns is None:
            fns = converted[key] = _convert(pure, training, treedef, signature)
        # Eagerly, variables enter the tf.function as handles: it reads them in its graph.
        return fns[tf.executing_eagerly()](list(params), list(state), rng, inputs)

    return run
