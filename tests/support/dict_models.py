"""Modules written the way Hugging Face's Flax models and Flax's examples write their calls:
several named inputs (ids and a mask), one dict of inputs, and dataclass outputs."""

from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

VOCAB, WIDTH = 11, 8


class MaskedEncoder(nn.Module):
    """`input_ids` and a required `attention_mask`, an optional `position_ids` (as BERT)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids=None, deterministic=True):
        x = nn.Embed(VOCAB, WIDTH)(input_ids)
        if position_ids is not None:
            x = x + nn.Embed(16, WIDTH, name="positions")(position_ids)
        x = nn.Dropout(0.5, deterministic=deterministic)(x)
        mask = attention_mask[..., None].astype(x.dtype)
        return nn.Dense(3)((x * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0))


class OneDict(nn.Module):
    """One parameter that takes a dict (a batch) whose keys happen to include its name."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x["x"] * x["scale"])


class TwoArgs(nn.Module):
    """Two parameters; given a dict with a key that is not one of them, the dict goes whole."""

    @nn.compact
    def __call__(self, x, scale=None):
        if isinstance(x, dict):
            return nn.Dense(2)(x["x"] + x["other"])
        return nn.Dense(2)(x if scale is None else x * scale)


class NNXMasked(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.out = nnx.Linear(WIDTH, 3, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        mask = attention_mask[..., None].astype(jnp.float32)
        return self.out((self.embed(input_ids) * mask).sum(axis=1))


@flax.struct.dataclass
class EncoderOutput:
    """As Hugging Face's `FlaxBaseModelOutput`: a flax.struct dataclass with optional fields."""

    last_hidden_state: Any
    pooled: Any = None
    attentions: Any = None


@flax.struct.dataclass
class Heads:
    logits: Any
    extra: Any = None


class StructOutputs(nn.Module):
    """Returns an EncoderOutput with one field None, a nested dataclass in another."""

    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(4)(x)
        return EncoderOutput(
            last_hidden_state=hidden, pooled=Heads(logits=nn.Dense(2)(hidden)), attentions=None
        )
