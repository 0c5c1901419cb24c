"""The TensorFlow backend: the pure function converted with jax2tf, once per input signature.

Unknown dimensions become symbolic (shape polymorphism): the leading dimension of every input
shares the symbol "batch", any other unknown dimension gets its own. Gradients flow through
jax2tf's custom gradient (a `jax.vjp` of the same function).
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


def compile_tensorflow(pure: Callable) -> Callable:
    converted: dict = {}

    def convert(training: bool, has_rng: bool, inputs):
        treedef, leaves = _signature(inputs)
        key = (training, has_rng, treedef, leaves)
        fn = converted.get(key)
        if fn is None:
            poly_inputs = treedef.unflatten(
                [_poly_shape(i, shape) for i, (shape, _) in enumerate(leaves)]
            )
            fn = jax2tf.convert(
                lambda p, s, r, x: pure(p, s, r, x, training),
                polymorphic_shapes=[None, None, None, poly_inputs],
                with_gradient=True,
            )
            converted[key] = fn
        return fn

    @tf.autograph.experimental.do_not_convert
    def run(params, state, rng, inputs, training):
        inputs = jax.tree.map(tf.convert_to_tensor, inputs)
        if rng is not None:
            rng = tf.cast(rng, tf.int32)
        fn = convert(training, rng is not None, inputs)
        return fn(list(params), list(state), rng, inputs)

    return run
