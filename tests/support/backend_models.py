"""Top-level modules for the cross-backend tests (importable by the loading subprocess)."""

import flax.linen as nn
import jax
from flax import nnx


class ConvBN(nn.Module):
    features: int = 4

    @nn.compact
    def __call__(self, inputs, training=False):
        x = nn.Conv(self.features, (3, 3))(inputs)
        x = nn.BatchNorm(use_running_average=not training)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        return nn.Dense(3)(x)


class NNXNet(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, dout, rngs=rngs)

    def __call__(self, inputs):
        return self.out(jax.nn.relu(self.bn(self.linear(inputs))))


class NNXBatchNormDropout(nnx.Module):
    """Linear + BatchNorm + Dropout + Linear, the NNX way (for export)."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, dout, rngs=rngs)

    def __call__(self, inputs):
        return self.out(self.dropout(jax.nn.relu(self.bn(self.linear(inputs)))))
