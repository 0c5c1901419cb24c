"""A corpus of real-world-style Flax models, used by tests/real_models/test_real_models.py.

Each model is written the way Flax's own examples (imagenet, lm1b, vae, sst2, gemma), the Flax
NNX guides and Hugging Face write theirs: `train` / `deterministic` arguments, config
dataclasses, BatchNorm, dropout, rng streams of their own, sown losses, `nn.scan`, `nnx.vmap` +
`nnx.scan` and a decode cache. Only the sizes are tiny. Nothing here knows about Keras or
flaxlayer except the one registered wrapper for the Hugging Face model, as a user would write it.

Everything is defined at the top level so that a saved `.keras` file can name it again; a fresh
process that imports this file (and keras, flaxlayer) can load every model saved from it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
from flax import nnx

try:  # the optional `hf` extra: transformers 4.x (5.x dropped its Flax models)
    from transformers import BertConfig, FlaxBertForSequenceClassification
except ImportError:  # pragma: no cover - exercised only without the extra
    BertConfig = FlaxBertForSequenceClassification = None

Array = jax.Array
ModuleDef = Any


# ============================================================================================
# (a) ResNet v1.5, Linen, in the style of examples/imagenet
# ============================================================================================


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions with a projected shortcut when the shape changes."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        # Zero-initialised last scale: every block starts as the identity.
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """A small ResNet: a strided stem, `stage_sizes` stages of `block_cls`, a Dense head."""

    stage_sizes: Sequence[int]
    num_classes: int
    block_cls: ModuleDef = ResNetBlock
    num_filters: int = 16
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=ResNetBlock)


# ============================================================================================
# (b) Decoder-only transformer language model, Linen, in the style of examples/lm1b
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters shared by every submodule (no kwarg plumbing)."""

    vocab_size: int
    emb_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    qkv_dim: int = 32
    mlp_dim: int = 64
    max_len: int = 64
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    deterministic: bool = False
    decode: bool = False
    dtype: Any = jnp.float32
    # Configured initializers, as lm1b's config holds them.
    kernel_init: Callable = nn.initializers.xavier_uniform()  # noqa: RUF009
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)  # noqa: RUF009


def right_shift(x, axis=1):
    """Shifts token ids one step to the right along `axis`, padding with 0 (BOS)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (1, 0)
    padded = jnp.pad(x, widths, constant_values=0)
    return jax.lax.slice_in_dim(padded, 0, x.shape[axis], axis=axis)


def sinusoid_table(max_len, features, min_scale=1.0, max_scale=10000.0):
    """A fixed (1, max_len, features) sinusoidal position table, computed with NumPy."""
    half = features // 2
    position = np.arange(max_len)[:, None]
    rate = min_scale * np.exp(np.arange(half) * (-np.log(max_scale / min_scale) / (half - 1)))
    table = np.zeros((max_len, features), np.float32)
    table[:, :half] = np.sin(position * rate)
    table[:, half : 2 * half] = np.cos(position * rate)
    return jnp.asarray(table[None])


class PositionEmbedding(nn.Module):
    """Adds sinusoidal position embeddings; in decode mode, the one of the current step."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, inputs_positions=None):
        cfg = self.config
        table = sinusoid_table(cfg.max_len, x.shape[-1])
        if cfg.decode:
            # The decode step lives in the "cache" collection, next to attention's keys/values.
            initialized = self.has_variable("cache", "step")
            step = self.variable("cache", "step", lambda: jnp.zeros((), jnp.uint32))
            if initialized:
                i = step.value
                step.value = i + 1
                return x + jax.lax.dynamic_slice(table, jnp.array((0, i, 0)), (1, 1, x.shape[-1]))
        if inputs_positions is not None:
            return x + jnp.take(table[0], inputs_positions, axis=0)
        return x + table[:, : x.shape[1]]


class FeedForward(nn.Module):
    """Dense -> relu -> dropout -> Dense -> dropout."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.Dense(
            cfg.mlp_dim,
            dtype=cfg.dtype,
            kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(cfg.bias_init, ("mlp",)),
        )(x)
        h = nn.relu(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=cfg.deterministic)
        out = nn.Dense(
            x.shape[-1],
            dtype=cfg.dtype,
            kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(cfg.bias_init, ("embed",)),
        )(h)
        return nn.Dropout(cfg.dropout_rate)(out, deterministic=cfg.deterministic)


class DecoderBlock(nn.Module):
    """Pre-LayerNorm causal self-attention and feed-forward, each with a residual."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask=None):
        cfg = self.config
        h = nn.LayerNorm(dtype=cfg.dtype)(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads,
            qkv_features=cfg.qkv_dim,
            dtype=cfg.dtype,
            kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("embed", "kv")),
            use_bias=False,
            broadcast_dropout=False,
            dropout_rate=cfg.attention_dropout_rate,
            deterministic=cfg.deterministic,
            decode=cfg.decode,
        )(h, mask=mask)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=cfg.deterministic)
        x = x + h
        return x + FeedForward(cfg)(nn.LayerNorm(dtype=cfg.dtype)(x))


class TransformerLM(nn.Module):
    """A decoder-only language model over token ids (0 is padding / BOS)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs, inputs_positions=None, inputs_segmentation=None):
        cfg = self.config
        assert inputs.ndim == 2, inputs.shape  # (batch, length)
        if cfg.decode:
            mask = None  # the attention cache masks the positions not yet written
        else:
            mask = nn.combine_masks(
                nn.make_attention_mask(inputs > 0, inputs > 0, dtype=cfg.dtype),
                nn.make_causal_mask(inputs, dtype=cfg.dtype),
            )
        if inputs_segmentation is not None:
            mask = nn.combine_masks(
                mask,
                nn.make_attention_mask(
                    inputs_segmentation, inputs_segmentation, jnp.equal, dtype=cfg.dtype
                ),
            )
        tokens = inputs.astype(jnp.int32)
        if not cfg.decode:
            tokens = right_shift(tokens)  # predict token t from the tokens before it
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.emb_dim,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
            name="embed",
        )
        x = embed(tokens)
        x = PositionEmbedding(cfg, name="posembed")(x, inputs_positions=inputs_positions)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=cfg.deterministic)
        x = x.astype(cfg.dtype)
        for i in range(cfg.num_layers):
            x = DecoderBlock(cfg, name=f"block_{i}")(x, mask=mask)
        x = nn.LayerNorm(dtype=cfg.dtype, name="final_norm")(x)
        logits = nn.Dense(
            cfg.vocab_size,
            dtype=cfg.dtype,
            kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(cfg.bias_init, ("vocab",)),
            name="logits",
        )(x)
        return logits.astype(cfg.dtype)


# ============================================================================================
# (c) Variational autoencoder, Linen, in the style of examples/vae
# ============================================================================================


class VAEEncoder(nn.Module):
    latents: int
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        mean = nn.Dense(self.latents, name="fc2_mean")(x)
        logvar = nn.Dense(self.latents, name="fc2_logvar")(x)
        return mean, logvar


class VAEDecoder(nn.Module):
    features: int
    hidden: int = 32

    @nn.compact
    def __call__(self, z):
        z = nn.relu(nn.Dense(self.hidden, name="fc1")(z))
        return nn.Dense(self.features, name="fc2")(z)


def reparameterize(rng, mean, logvar):
    std = jnp.exp(0.5 * logvar)
    return mean + std * jax.random.normal(rng, logvar.shape)


def kl_divergence(mean, logvar):
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)


class VAE(nn.Module):
    """Returns reconstruction logits; samples z from the "noise" rng stream while training
    (the posterior mean otherwise) and sows the mean KL divergence into "losses"."""

    features: int
    latents: int = 8
    kl_weight: float = 0.1

    def setup(self):
        self.encoder = VAEEncoder(self.latents)
        self.decoder = VAEDecoder(self.features)

    def __call__(self, x, training: bool = False):
        mean, logvar = self.encoder(x)
        z = reparameterize(self.make_rng("noise"), mean, logvar) if training else mean
        self.sow("losses", "kl", self.kl_weight * jnp.mean(kl_divergence(mean, logvar)))
        return self.decoder(z)

    def generate(self, z):
        return nn.sigmoid(self.decoder(z))


# ============================================================================================
# (d) Bidirectional LSTM text classifier, Linen, in the style of examples/sst2
# ============================================================================================


@jax.vmap
def reverse_valid(sequence, length):
    """Reverses the first `length` steps of one sequence, keeping the padding at the end."""
    return jnp.flip(jnp.roll(sequence, sequence.shape[0] - length, axis=0), axis=0)


class ScannedLSTM(nn.Module):
    """One LSTM direction: `nn.scan` of an OptimizedLSTMCell over the time axis."""

    hidden_size: int

    @functools.partial(
        nn.scan,
        variable_broadcast="params",
        in_axes=1,
        out_axes=1,
        split_rngs={"params": False},
    )
    @nn.compact
    def __call__(self, carry, x):
        return nn.OptimizedLSTMCell(self.hidden_size)(carry, x)

    def initialize_carry(self, input_shape):
        # The carry starts at zeros: the key is never used.
        return nn.OptimizedLSTMCell(self.hidden_size, parent=None).initialize_carry(
            jax.random.key(0), input_shape
        )


class BiLSTM(nn.Module):
    hidden_size: int

    def setup(self):
        self.forward_lstm = ScannedLSTM(self.hidden_size)
        self.backward_lstm = ScannedLSTM(self.hidden_size)

    def __call__(self, embedded, lengths):
        carry = self.forward_lstm.initialize_carry(embedded[:, 0].shape)
        _, forward = self.forward_lstm(carry, embedded)
        reversed_inputs = reverse_valid(embedded, lengths)
        carry = self.backward_lstm.initialize_carry(reversed_inputs[:, 0].shape)
        _, backward = self.backward_lstm(carry, reversed_inputs)
        backward = reverse_valid(backward, lengths)
        return jnp.concatenate([forward, backward], axis=-1)


class TextClassifier(nn.Module):
    """Token ids (0 = padding, at the end) -> Embed -> BiLSTM -> masked mean -> MLP logits."""

    vocab_size: int
    num_classes: int
    embedding_size: int = 16
    hidden_size: int = 16
    dropout_rate: float = 0.2
    pad_id: int = 0
    deterministic: bool | None = None

    def setup(self):
        self.embedder = nn.Embed(
            self.vocab_size, self.embedding_size, embedding_init=nn.initializers.normal(0.1)
        )
        self.encoder = BiLSTM(self.hidden_size)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.hidden = nn.Dense(self.hidden_size)
        self.classifier = nn.Dense(self.num_classes)

    def __call__(self, token_ids: Array, deterministic: bool | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        valid = token_ids != self.pad_id
        lengths = jnp.sum(valid, axis=-1)
        x = self.dropout(self.embedder(token_ids), deterministic=deterministic)
        encoded = self.encoder(x, lengths)
        summary = jnp.sum(encoded * valid[..., None], axis=1) / jnp.maximum(lengths, 1)[:, None]
        summary = self.dropout(summary, deterministic=deterministic)
        return self.classifier(nn.tanh(self.hidden(summary)))


# ============================================================================================
# (e) NNX transformer with a dataclass config, in the style of examples/gemma
# ============================================================================================


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int
    embed_dim: int = 32
    num_heads: int = 2
    num_layers: int = 2
    mlp_dim: int = 64
    max_len: int = 32
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32


class GPTBlock(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(config.embed_dim, dtype=config.dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=config.embed_dim,
            dropout_rate=config.dropout_rate,
            broadcast_dropout=False,
            decode=False,
            dtype=config.dtype,
            rngs=rngs,
        )
        self.mlp_norm = nnx.LayerNorm(config.embed_dim, dtype=config.dtype, rngs=rngs)
        self.up = nnx.Linear(config.embed_dim, config.mlp_dim, dtype=config.dtype, rngs=rngs)
        self.down = nnx.Linear(config.mlp_dim, config.embed_dim, dtype=config.dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def __call__(self, x, mask, *, deterministic: bool = False):
        h = self.attn(self.attn_norm(x), mask=mask, deterministic=deterministic)
        x = x + self.dropout(h, deterministic=deterministic)
        h = self.down(nnx.gelu(self.up(self.mlp_norm(x))))
        return x + self.dropout(h, deterministic=deterministic)


class MiniGPT(nnx.Module):
    """A causal LM: token ids (batch, length) -> logits (batch, length, vocab)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.embed_dim, rngs=rngs)
        self.pos_embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.max_len, config.embed_dim))
        )
        self.layers = nnx.List([GPTBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.embed_dim, dtype=config.dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)
        self.rngs = rngs

    def __call__(self, tokens, *, deterministic: bool = False):
        length = tokens.shape[1]
        x = self.embed(tokens) + self.pos_embed[:length]
        x = self.dropout(x, deterministic=deterministic).astype(self.config.dtype)
        mask = nnx.make_causal_mask(tokens)
        for layer in self.layers:
            x = layer(x, mask, deterministic=deterministic)
        return self.embed.attend(self.final_norm(x))


# ============================================================================================
# (f) NNX stack built with nnx.vmap and run with nnx.scan ("scan over layers")
# ============================================================================================


class ScanBlock(nnx.Module):
    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(features, features, rngs=rngs)
        self.bn = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.dropout(self.bn(self.linear(x))))


class ScannedMLP(nnx.Module):
    """In-projection, `num_layers` ScanBlocks stacked on a leading axis, out-projection."""

    def __init__(self, din: int, features: int, dout: int, num_layers: int, *, rngs: nnx.Rngs):
        self.num_layers = num_layers
        self.proj_in = nnx.Linear(din, features, rngs=rngs)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs: nnx.Rngs):
            return ScanBlock(features, rngs=rngs)

        self.blocks = create_block(rngs)
        self.proj_out = nnx.Linear(features, dout, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return self.proj_out(forward(self.proj_in(x), self.blocks))


# ============================================================================================
# (g) A Hugging Face Flax model (transformers 4.x, optional extra `hf`)
# ============================================================================================


def tiny_bert_config(**overrides):
    """A tiny BertConfig, built locally (nothing is downloaded)."""
    kwargs = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


@keras.saving.register_keras_serializable(package="corpus")
def bert_classifier_logits(module, inputs, training):
    """Calls a Hugging Face Flax BERT classifier module on token ids (0 = padding)."""
    input_ids = inputs.astype(jnp.int32)
    attention_mask = (input_ids != 0).astype(jnp.int32)
    token_type_ids = jnp.zeros_like(input_ids)
    position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    outputs = module(
        input_ids,
        attention_mask,
        token_type_ids,
        position_ids,
        None,  # head_mask
        deterministic=not training,
    )
    return outputs.logits
