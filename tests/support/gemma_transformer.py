"""A Gemma-style NNX transformer (for tests/real_code/test_config_types.py).

Written the way Flax's Gemma example writes its `transformer.py`: a frozen `TransformerConfig`
dataclass whose `attention_types` field holds a tuple of `modules.AttentionType` members and
whose `query_pre_attn_norm` holds a member of an enum defined here, and a `Transformer` that
takes the config in `__init__`.
"""

import dataclasses
import enum
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

import gemma_modules as modules


class QueryPreAttentionNormalisation(enum.Enum):
    BY_ONE_OVER_SQRT_HEAD_DIM = enum.auto()
    BY_EMBED_DIM_DIV_NUM_HEADS = enum.auto()


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    num_embed: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    attention_types: Sequence[modules.AttentionType]
    query_pre_attn_norm: QueryPreAttentionNormalisation = (
        QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM
    )
    sliding_window_size: int | None = None

    def query_scale(self) -> float:
        if self.query_pre_attn_norm is QueryPreAttentionNormalisation.BY_EMBED_DIM_DIV_NUM_HEADS:
            return (self.embed_dim // self.num_heads) ** -0.5
        return self.head_dim**-0.5

    @classmethod
    def tiny(cls) -> "TransformerConfig":
        return cls(
            num_layers=2,
            num_embed=32,
            embed_dim=8,
            hidden_dim=16,
            num_heads=2,
            head_dim=8,
            attention_types=(
                modules.AttentionType.LOCAL_SLIDING,
                modules.AttentionType.GLOBAL,
            ),
            query_pre_attn_norm=QueryPreAttentionNormalisation.BY_EMBED_DIM_DIV_NUM_HEADS,
            sliding_window_size=2,
        )


class Transformer(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = nnx.Embed(config.num_embed, config.embed_dim, rngs=rngs)
        self.layers = nnx.List(
            modules.Block(
                config.num_heads,
                config.embed_dim,
                config.head_dim,
                config.hidden_dim,
                attn_type,
                query_scale=config.query_scale(),
                sliding_window_size=config.sliding_window_size,
                rngs=rngs,
            )
            for attn_type in config.attention_types
        )
        self.final_norm = nnx.RMSNorm(config.embed_dim, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder(tokens.astype(jnp.int32))
        for layer in self.layers:
            x = layer(x)
        return self.embedder.attend(self.final_norm(x))
