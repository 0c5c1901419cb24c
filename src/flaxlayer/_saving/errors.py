"""The error every refused save or load raises, and whether loading is in safe mode."""

from flaxlayer._compat import keras_safe_mode


class SerializationError(ValueError):
    """A module or value that cannot be saved, or a `.keras` config that cannot be loaded.

    Raised when saving a field no loader could rebuild (a lambda, a closure, an arbitrary
    object), and for every tampered or inconsistent file, naming the config path of the entry.

    Example:

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> from flaxlayer import FlaxLayer, SerializationError
    >>> layer = FlaxLayer(nn.Dense(2, kernel_init=lambda key, shape, dtype: jnp.zeros(shape)))
    >>> try:
    ...     layer.get_config()
    ... except SerializationError as error:
    ...     print("it is a lambda" in str(error))
    True
    """


def in_safe_mode() -> bool:
    """Whether Keras loads in safe mode now (its default when no scope says otherwise)."""
    return keras_safe_mode() is not False
