"""The JAX backend: the layer's pure function, compiled once per input signature."""

from collections.abc import Callable

import jax


def compile_jax(pure: Callable) -> Callable:
    # Inside Keras's compiled steps the jitted function is traced inline; in eager calls (a
    # notebook's `layer(x)`, `jit_compile=False`) it runs as one cached XLA executable instead
    # of Flax's Python op by op.
    return jax.jit(pure, static_argnames=("training",))
