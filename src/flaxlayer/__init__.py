"""flaxlayer: any Flax module, or pure JAX function, as a first-class Keras 3 layer."""

from importlib.metadata import version as _version

from flaxlayer._bridges import share_accelerator_memory as _share_accelerator_memory
from flaxlayer._flax_layer import FlaxLayer as FlaxLayer
from flaxlayer._jax_layer import JaxLayer as JaxLayer
from flaxlayer._saving import SerializationError as SerializationError

#: The installed distribution's version: pyproject.toml is the one place it is written.
__version__ = _version("flaxlayer")

__all__ = ["FlaxLayer", "JaxLayer", "SerializationError", "__version__"]

# On the PyTorch and TensorFlow backends, JAX allocates GPU memory on demand unless the user
# configured it (see `_bridges.share_accelerator_memory`): before anything starts JAX's clients.
_share_accelerator_memory()
