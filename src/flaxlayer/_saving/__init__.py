"""Saving and loading a module's configuration in a `.keras` file, under the rules of `_trust`.

- `errors`: `SerializationError`, and whether Keras loads in safe mode.
- `schema`: the entry kinds and their keys, and the types a class declares its fields with.
- `codec`: `KindCodec`, what each module kind (Linen, NNX) implements to be saved and loaded.
- `encoder`: `Encoder`, which writes a module's configuration.
- `decoder`: `Decoder`, which checks a configuration whole and rebuilds it, with the checks
  (`checks`) and builders (`builds`) of the entry kinds every module kind shares.
"""

from flaxlayer._saving.codec import KindCodec
from flaxlayer._saving.decoder import Decoder
from flaxlayer._saving.encoder import Encoder
from flaxlayer._saving.errors import SerializationError
from flaxlayer._saving.schema import MAX_DEPTH, TAG, declared_types, schema

__all__ = [
    "MAX_DEPTH",
    "TAG",
    "Decoder",
    "Encoder",
    "KindCodec",
    "SerializationError",
    "declared_types",
    "schema",
]
