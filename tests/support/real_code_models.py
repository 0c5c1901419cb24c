"""Small modules written the way real Flax code writes them (for test_real_flax_code.py).

Signatures as in Flax's examples and Hugging Face's Flax models, configuration in config
objects, and method wrappers next to the module class. Top level, so saved models find them.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax.numpy as jnp
from flax import nnx

# ------------------------------------------------------------------------------ signatures


class TrainFlag(nn.Module):
    """`train` as Flax's examples name it: BatchNorm and Dropout follow it."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dropout(0.5, deterministic=not train)(x)


class EveryFlag(nn.Module):
    """Several flag names at once, and an optional argument that keeps its default."""

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, *, deterministic=True, is_training=False):
        h = nn.Embed(10, 4)(input_ids).mean(axis=1)
        marker = jnp.asarray([float(deterministic), float(is_training)])
        extra = 0.0 if attention_mask is None else 100.0
        return nn.Dense(2)(h) * 0.0 + marker + extra


class NNXTrain(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.linear(x) + (1.0 if train else 0.0)


# -------------------------------------------------------------------------- config objects


@dataclasses.dataclass(frozen=True)
class InnerConfig:
    width: int = 4
    activation: Any = nn.gelu


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    inner: InnerConfig = InnerConfig()
    depth: int = 1
    dtype: Any = jnp.float32
    sizes: tuple = (1, 2)


@dataclasses.dataclass(frozen=True)
class OtherConfig:
    """Not what any module declares: a file naming it instead of OuterConfig is refused."""

    inner: InnerConfig = InnerConfig()
    depth: int = 1
    dtype: Any = jnp.float32
    sizes: tuple = (1, 2)


@dataclasses.dataclass(frozen=True)
class WiderOuterConfig(OuterConfig):
    """A subclass of the declared type: accepted."""

    extra: int = 0


class Configured(nn.Module):
    config: OuterConfig

    @nn.compact
    def __call__(self, x):
        for _ in range(self.config.depth):
            x = self.config.inner.activation(
                nn.Dense(self.config.inner.width, dtype=self.config.dtype)(x)
            )
        return x


class OptionalConfigured(nn.Module):
    config: Optional[OuterConfig] = None  # noqa: UP045 - the spelling real code uses

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.config.inner.width)(x)


@flax.struct.dataclass
class StructConfig:
    width: int = 3
    scale: float = 2.0


class StructConfigured(nn.Module):
    config: StructConfig

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.config.width)(x) * self.config.scale


class DictStyleConfig:
    """The Hugging Face convention: to_dict() and a classmethod from_dict()."""

    def __init__(self, hidden_size=4, num_labels=2, id2label=None, **kwargs):
        self.hidden_size = hidden_size
        self.num_labels = num_labels
        self.id2label = id2label or {0: "no", 1: "yes"}

    def to_dict(self):
        return {
            "hidden_size": self.hidden_size,
            "num_labels": self.num_labels,
            "id2label": dict(self.id2label),
        }

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return cls(**config_dict)


class DictConfigured(nn.Module):
    config: DictStyleConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.hidden_size, dtype=self.dtype)(x)
        return nn.Dense(self.config.num_labels, dtype=self.dtype)(h)


class Undeclared(nn.Module):
    config: Any = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.config.inner.width)(x)


@dataclasses.dataclass
class NNXConfig:
    features: int = 4
    rate: float = 0.1


class NNXConfigured(nnx.Module):
    def __init__(self, config: NNXConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.linear = nnx.Linear(3, config.features, rngs=rngs)
        self.drop = nnx.Dropout(config.rate, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = False):
        return self.drop(self.linear(x), deterministic=deterministic)


# ---------------------------------------------------------------------- method functions


class TwoInputs(nn.Module):
    @nn.compact
    def forward(self, a, b, deterministic):
        x = nn.Dense(4)(jnp.concatenate([a, b], axis=-1))
        return nn.Dropout(0.5, deterministic=deterministic)(x)


def call_two_inputs(module, inputs, training):
    """Defined next to TwoInputs: saved and loaded with no registration."""
    a, b = inputs
    return module.forward(a, b, not training)
