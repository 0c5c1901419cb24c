"""The models of the file-format compatibility files in `files/`.

Every class and function here is recorded by name in a golden `.keras` file: renaming,
moving or changing one breaks those files, so nothing here changes. A later format change adds
its own models and files; it never edits these.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
from flax import nnx

from flaxlayer import FlaxLayer, JaxLayer

try:  # the optional `hf` extra
    from transformers import BertConfig, FlaxBertForSequenceClassification
except ImportError:  # pragma: no cover - the suite installs it
    BertConfig = FlaxBertForSequenceClassification = None


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """The CNN's hyperparameters, as Flax examples pass a config dataclass."""

    features: int = 4
    hidden: int = 16
    classes: int = 3
    rate: float = 0.25


class GoldenCNN(nn.Module):
    """Conv + BatchNorm + Dropout + Dense, configured by a dataclass."""

    config: CNNConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = self.config
        x = nn.Conv(c.features, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(c.hidden)(x)
        x = nn.Dropout(c.rate, deterministic=not train)(x)
        return nn.Dense(c.classes)(x)


class GoldenNNX(nnx.Module):
    """Linear + BatchNorm + Dropout + Linear, as NNX modules are written."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(din, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.linear2 = nnx.Linear(8, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.drop(nnx.relu(self.norm(self.linear1(x)))))


class GoldenMLP(nn.Module):
    """Two Dense layers: the fine-tuned model (LoRA on one kernel, int8 on the other)."""

    hidden: int = 16
    out: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.out, name="head")(x)


@keras.saving.register_keras_serializable(package="golden")
def golden_init(rng, inputs):
    """JaxLayer init: a weight, a bias and a running mean (state)."""
    params = {"w": jax.random.normal(rng, (inputs.shape[-1], 5)) * 0.3, "b": jnp.zeros(5)}
    return params, {"mean": jnp.zeros(5)}


@keras.saving.register_keras_serializable(package="golden")
def golden_call(params, state, inputs, training):
    """JaxLayer call: affine + tanh; training updates the running mean."""
    y = jnp.tanh(inputs @ params["w"] + params["b"])
    mean = jnp.where(training, 0.5 * state["mean"] + 0.5 * y.mean(0), state["mean"])
    return y - mean, {"mean": mean}


@keras.saving.register_keras_serializable(package="golden")
def golden_bert_logits(module, inputs, training):
    """A Hugging Face Flax BERT classifier on token ids (0 = padding)."""
    ids = inputs.astype(jnp.int32)
    outputs = module(
        ids,
        (ids != 0).astype(jnp.int32),
        jnp.zeros_like(ids),
        jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape),
        None,
        deterministic=not training,
    )
    return outputs.logits


def _model(layer, input_shape, dtype="float32"):
    inputs = keras.Input(input_shape, dtype=dtype)
    return keras.Model(inputs, layer(inputs))


def cnn():
    return _model(FlaxLayer(GoldenCNN(CNNConfig()), name="cnn", seed=1), (8, 8, 1))


def nnx_model():
    return _model(FlaxLayer(GoldenNNX(3, 2, rngs=nnx.Rngs(0)), name="nnx", seed=2), (3,))


def jax_layer():
    return _model(JaxLayer(golden_call, golden_init, name="fn", seed=3), (4,))


def finetuned():
    """LoRA on `hidden`, int8 on `head`; the first kernel's LoRA keeps it frozen."""
    layer = FlaxLayer(GoldenMLP(), name="mlp", seed=4)
    model = _model(layer, (6,))
    layer.quantize("int8", paths=r"params/head/kernel")
    layer.enable_lora(2, paths=r"params/hidden/kernel")
    return model


def bert():
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=2,
    )
    hf = FlaxBertForSequenceClassification(config, seed=0)
    layer = FlaxLayer(
        hf.module, method=golden_bert_logits, variables={"params": hf.params}, name="bert"
    )
    return _model(layer, (6,), dtype="int32")


#: name -> (builder, input maker): what `make_golden.py` writes and the test loads.
BUILDERS = {
    "linen_cnn": cnn,
    "nnx": nnx_model,
    "jax_layer": jax_layer,
    "lora_int8": finetuned,
    "hf_bert": bert,
}
