"""Gemma-style NNX building blocks (for tests/real_code/test_config_types.py).

Written the way Flax's Gemma example writes its `modules.py`: an `AttentionType` enum, and
layers that take the attention type of their block as an `__init__` argument.
"""

import enum

import jax.numpy as jnp
from flax import nnx


class AttentionType(enum.Enum):
    GLOBAL = 1
    LOCAL_SLIDING = 2


class Attention(nnx.Module):
    def __init__(
        self,
        num_heads: int,
        features: int,
        head_dim: int,
        attn_type: AttentionType,
        *,
        query_scale: float,
        sliding_window_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.attn_type = attn_type
        self.sliding_window_size = sliding_window_size
        self.query_scale = query_scale
        self.qkv = nnx.Einsum("BTD,SNDH->SBTNH", (3, num_heads, features, head_dim), rngs=rngs)
        self.out = nnx.Einsum("BTNH,NHD->BTD", (num_heads, head_dim, features), rngs=rngs)

    def __call__(self, x):
        q, k, v = self.qkv(x)
        logits = jnp.einsum("BTNH,BSNH->BTSN", q * self.query_scale, k)
        length = x.shape[1]
        positions = jnp.arange(length)
        mask = positions[:, None] >= positions[None, :]
        if self.attn_type == AttentionType.LOCAL_SLIDING:
            mask = mask & (positions[:, None] - positions[None, :] < self.sliding_window_size)
        logits = jnp.where(mask[None, :, :, None], logits, -1e9)
        probs = nnx.softmax(logits, axis=2)
        return self.out(jnp.einsum("BTSN,BSNH->BTNH", probs, v))


class Block(nnx.Module):
    def __init__(
        self,
        num_heads: int,
        embed_dim: int,
        head_dim: int,
        hidden_dim: int,
        attn_type: AttentionType,
        *,
        query_scale: float,
        sliding_window_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.pre_attention_norm = nnx.RMSNorm(embed_dim, rngs=rngs)
        self.attn = Attention(
            num_heads,
            embed_dim,
            head_dim,
            attn_type,
            query_scale=query_scale,
            sliding_window_size=sliding_window_size,
            rngs=rngs,
        )
        self.pre_ffw_norm = nnx.RMSNorm(embed_dim, rngs=rngs)
        self.up = nnx.Linear(embed_dim, hidden_dim, rngs=rngs)
        self.down = nnx.Linear(hidden_dim, embed_dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.down(nnx.gelu(self.up(self.pre_ffw_norm(x))))
