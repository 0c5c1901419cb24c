"""A tiny Hugging Face mT5 encoder (for tests/real_code/test_config_types.py and the config
attack tests): `FlaxMT5EncoderModel`'s module is the T5 module class, whose field is declared
`config: T5Config`, holding an `MT5Config` (a sibling: both subclass `PretrainedConfig`).

transformers 4.57's T5 code calls `jnp.clip(..., a_max=...)`, which JAX 0.10 removed;
`jax_clip_keywords()` gives the T5 code a `jnp` whose `clip` takes those keywords, so that the
model runs here (it changes nothing that flaxlayer does).
"""

import contextlib
import types

import jax.numpy as jnp
import keras
import transformers.models.t5.modeling_flax_t5 as modeling_flax_t5
from transformers import FlaxMT5EncoderModel, MT5Config


def tiny_mt5_config(**overrides) -> MT5Config:
    """A tiny MT5Config, built locally (nothing is downloaded)."""
    kwargs = dict(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    return MT5Config(**(kwargs | overrides))


def tiny_mt5_encoder(**overrides) -> FlaxMT5EncoderModel:
    with jax_clip_keywords():
        return FlaxMT5EncoderModel(tiny_mt5_config(**overrides), seed=0)


@keras.saving.register_keras_serializable(package="mt5_models")
def mt5_encode(module, inputs, training):
    """The encoder's last hidden state for token ids (0 = padding)."""
    input_ids = inputs.astype(jnp.int32)
    attention_mask = (input_ids != 0).astype(jnp.int32)
    return module(input_ids, attention_mask, deterministic=not training).last_hidden_state


class _ClipKeywords(types.ModuleType):
    """jax.numpy, with a `clip` that also takes NumPy's `a_min`/`a_max` keywords."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def clip(a, a_min=None, a_max=None, **kwargs):
        return jnp.clip(a, min=a_min, max=a_max, **kwargs)


@contextlib.contextmanager
def jax_clip_keywords():
    """The T5 code sees a `jnp` whose clip takes a_min/a_max while this context is open."""
    original = modeling_flax_t5.jnp
    modeling_flax_t5.jnp = _ClipKeywords("jax.numpy")
    try:
        yield
    finally:
        modeling_flax_t5.jnp = original
