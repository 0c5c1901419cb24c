"""Classes an attacker's file names in config and enum positions (for
tests/saving/test_config_type_attacks.py and tests/real_code/test_config_types.py).

The loading process imported this module (as it may import any module), but the crafted files
build no Flax module class defined here, so nothing here is "beside" a module class of theirs
(the two module classes here are saved only by the tests that show saving them is refused).
Each class records being used by writing a file: a constructor, `from_dict`, or an enum
metaclass's own member lookup. A `.keras` file must never get any of them to run.
"""

import dataclasses
import enum
import os
from typing import Any

import flax.linen as nn
from transformers import PretrainedConfig

import lm1b_models
import loose_enum_models

#: The file every class here writes when used (set by the test through the environment).
MARKER_ENV = "FLAXLAYER_CONFIG_ATTACK_MARKER"


def _mark(what: str) -> None:
    with open(os.environ.get(MARKER_ENV, os.devnull), "a") as f:
        f.write(f"{what}\n")


class LookalikeConfig(PretrainedConfig):
    """Subclasses transformers' PretrainedConfig, like MT5Config, but is not in transformers."""

    model_type = "lookalike"

    def __init__(self, **kwargs):
        _mark("LookalikeConfig.__init__")
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        _mark("LookalikeConfig.from_dict")
        return cls(**config_dict)


@dataclasses.dataclass(frozen=True)
class PlantedConfig:
    """A dataclass config defined beside no module class the files build."""

    vocab_size: int = 32

    def __post_init__(self):
        _mark("PlantedConfig.__post_init__")


class _LookupSpy(enum.EnumType):
    def __getitem__(cls, name):
        _mark("SpyEnum lookup")
        return super().__getitem__(name)


class SpyEnum(enum.Enum, metaclass=_LookupSpy):
    GLOBAL = 1
    LOCAL_SLIDING = 2


class StrayWrapper(nn.Module):
    """A wrapper in another module than its config's: its `config` is declared `Any` (saving it
    is refused: TransformerConfig is beside no module class the model saves)."""

    config: Any

    @nn.compact
    def __call__(self, inputs):
        return lm1b_models.TransformerLM(self.config)(inputs)


class StrayModeHolder(nn.Module):
    """Holds a `loose_enum_models.Mode` member in a field declared `Any` (saving it is
    refused: Mode is beside no module class the model saves)."""

    mode: Any = loose_enum_models.Mode.FAST

    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(2)(inputs)
