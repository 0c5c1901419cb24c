"""The models and synthetic data the benchmarks run on (fixed seeds, nothing downloaded).

- `CNN`: the seed's first example (the first example module of `keras.layers.FlaxLayer`'s
  documentation): Conv 32 3x3, relu, avg_pool 2x2, flatten, Dense 200, relu, Dense 10, softmax on
  28x28x1 images. Compute-bound.
- `TinyMLP`: Dense 64, relu, Dense 10, softmax on 32 features. Overhead-bound: a step is mostly
  dispatch and bookkeeping, so it shows what a layer adds per step.
- `BlockMLP` / `BlockMLPNNX`: 6 blocks of Dense(64) + BatchNorm + relu, then Dense 10 (Linen and
  NNX): the benchmark MLP for eager `layer(x)` and `predict_on_batch` latency.
- `Encoder`: a transformer encoder (pre-norm attention and MLP blocks) for fine-tuning.

`cpu_name()` names the machine they run on.
"""

import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SEED = 0
N_CLASSES = 10
CNN_INPUT = (28, 28, 1)
MLP_FEATURES = 32
BLOCK_FEATURES = 64
BLOCKS = 6


class CNN(nn.Module):
    """The seed's first example, verbatim."""

    @nn.compact
    def __call__(self, inputs):
        x = inputs
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=200)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        x = nn.softmax(x)
        return x


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        x = nn.relu(nn.Dense(64)(inputs))
        return nn.softmax(nn.Dense(N_CLASSES)(x))


class BlockMLP(nn.Module):
    """6 x (Dense + BatchNorm + relu), then Dense 10."""

    @nn.compact
    def __call__(self, inputs, training=False):
        x = inputs
        for _ in range(BLOCKS):
            x = nn.Dense(BLOCK_FEATURES)(x)
            x = nn.BatchNorm(use_running_average=not training, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(N_CLASSES)(x)


class BlockMLPNNX(nnx.Module):
    """The same network in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        width = BLOCK_FEATURES  # the inputs have BLOCK_FEATURES features too
        self.dense = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(BLOCKS)])
        self.norm = nnx.List(
            [nnx.BatchNorm(BLOCK_FEATURES, momentum=0.9, rngs=rngs) for _ in range(BLOCKS)]
        )
        self.head = nnx.Linear(BLOCK_FEATURES, N_CLASSES, rngs=rngs)

    def __call__(self, inputs):
        x = inputs
        for dense, norm in zip(self.dense, self.norm, strict=True):
            x = nnx.relu(norm(dense(x)))
        return self.head(x)


WORKLOADS = {
    "cnn": {"module": CNN, "input": CNN_INPUT, "label": "CNN (seed's first example)"},
    "mlp": {"module": TinyMLP, "input": (MLP_FEATURES,), "label": "tiny MLP"},
}


def classification_data(input_shape: tuple, n: int, seed: int = SEED):
    """`n` float32 inputs in [0, 1) and int32 labels in [0, 10)."""
    g = np.random.default_rng(seed)
    x = g.random((n, *input_shape), dtype=np.float32)
    y = g.integers(0, N_CLASSES, size=n).astype("int32")
    return x, y


def block_inputs(batch: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, BLOCK_FEATURES)).astype("float32")


def sparse_categorical_crossentropy(probs, labels):
    """Keras's loss on probabilities: clip to [eps, 1 - eps], then the mean negative log."""
    eps = 1e-7
    picked = jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
    return -jnp.mean(jnp.log(jnp.clip(picked, eps, 1.0 - eps)))


def init_params(module: nn.Module, input_shape: tuple):
    return module.init(jax.random.key(SEED), jnp.zeros((1, *input_shape), jnp.float32))


class EncoderBlock(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.MultiHeadDotProductAttention(self.heads, name="attention")(nn.LayerNorm()(x))
        x = x + y
        y = nn.Dense(4 * self.width, name="mlp_in")(nn.LayerNorm()(x))
        return x + nn.Dense(self.width, name="mlp_out")(nn.gelu(y))


class Encoder(nn.Module):
    """Dense embedding, `depth` blocks, mean-pooled into an 8-wide head."""

    width: int = 1024
    heads: int = 16
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.width, name="embed")(x)
        for i in range(self.depth):
            x = EncoderBlock(self.width, self.heads, name=f"block_{i}")(x)
        return nn.Dense(8, name="head")(nn.LayerNorm()(x).mean(axis=1))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
