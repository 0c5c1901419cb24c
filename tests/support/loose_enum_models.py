"""A module class holding an enum member in a field declared `Any` (for
tests/real_code/test_config_types.py): the enum is defined beside the module class, so a file
that builds `ModeHolder` may hold its members there."""

import enum
from typing import Any

import flax.linen as nn


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


class ModeHolder(nn.Module):
    mode: Any = Mode.FAST

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(2)(inputs) * (2.0 if self.mode is Mode.SLOW else 1.0)
