"""Backend bridges: run a pure JAX function on the tensors of the active Keras backend."""

from collections.abc import Callable

import keras

SUPPORTED_BACKENDS = ("jax",)


def compile_for_backend(pure: Callable, *, owner: str) -> Callable:
    """Returns `run(params, state, rng, inputs, training)` for the active Keras backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        from flaxlayer._bridges.jax import compile_jax

        return compile_jax(pure)
    raise unsupported_backend(owner, backend)


def unsupported_backend(owner: str, backend: str) -> RuntimeError:
    return RuntimeError(
        f"{owner}: the Keras backend is {backend!r}, but flaxlayer runs only on "
        f"{', '.join(repr(b) for b in SUPPORTED_BACKENDS)} in this version. Set "
        "KERAS_BACKEND=jax before importing keras (or in ~/.keras/keras.json)."
    )


def check_backend(owner: str) -> None:
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise unsupported_backend(owner, backend)
