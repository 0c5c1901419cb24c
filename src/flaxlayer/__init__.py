"""flaxlayer: any Flax module, or pure JAX function, as a first-class Keras 3 layer."""

from flaxlayer._flax_layer import FlaxLayer as FlaxLayer
from flaxlayer._jax_layer import JaxLayer as JaxLayer
from flaxlayer._serialization import SerializationError as SerializationError

__version__ = "0.1.0"

__all__ = ["FlaxLayer", "JaxLayer", "SerializationError", "__version__"]
