"""An lm1b-style language model (for tests/real_code/test_config_types.py).

Written the way Flax's lm1b example writes it: a frozen `TransformerConfig` dataclass next to
the modules that read it, and a wrapper whose `config` field is declared loosely (`Any`), as
training code often declares it. The config class is defined in this module, beside the
module classes a saved file builds, so a `.keras` file may hold it in the loose field.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 32
    emb_dim: int = 8
    num_heads: int = 2
    num_layers: int = 1
    mlp_dim: int = 16
    max_len: int = 16
    dropout_rate: float = 0.1
    deterministic: bool = False
    dtype: Any = jnp.float32


class MlpBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs):
        cfg = self.config
        x = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype)(inputs)
        x = nn.Dropout(cfg.dropout_rate)(nn.relu(x), deterministic=cfg.deterministic)
        return nn.Dense(inputs.shape[-1], dtype=cfg.dtype)(x)


class DecoderLayer(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs):
        cfg = self.config
        x = nn.LayerNorm(dtype=cfg.dtype)(inputs)
        mask = nn.make_causal_mask(jnp.ones(inputs.shape[:2], jnp.int32))
        x = nn.SelfAttention(cfg.num_heads, dtype=cfg.dtype, deterministic=True)(x, mask=mask)
        x = x + inputs
        return x + MlpBlock(cfg)(nn.LayerNorm(dtype=cfg.dtype)(x))


class TransformerLM(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype)
        x = embed(inputs.astype(jnp.int32))
        pos = self.param("pos", nn.initializers.normal(0.02), (cfg.max_len, cfg.emb_dim))
        x = x + pos[: inputs.shape[1]]
        for _ in range(cfg.num_layers):
            x = DecoderLayer(cfg)(x)
        return embed.attend(nn.LayerNorm(dtype=cfg.dtype)(x))


class Wrapper(nn.Module):
    """The model a training script builds: its `config` declared as `Any`."""

    config: Any

    @nn.compact
    def __call__(self, inputs, train: bool = False):
        config = dataclasses.replace(self.config, deterministic=not train)
        return TransformerLM(config)(inputs)
