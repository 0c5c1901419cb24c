"""The user's own model file, for the safe-loading attack tests (tests/saving/attacks).

Written as a user writes one: Flax Linen and NNX modules at the top level, an activation of
their own, an ordinary helper that writes a file, and a JAX function registered with Keras. A
saved model finds these classes again because the loading script imported this file.
"""

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import keras
from flax import nnx


def scaled_tanh(x):
    """An activation of the user's own."""
    return 1.7159 * jnp.tanh(2.0 * x / 3.0)


def write_report(path, text):
    """Writes a short text report (metrics, a summary) to `path`."""
    with open(path, "w") as f:
        f.write(f"{text}\n")


class Net(nn.Module):
    """A Dense layer with a configurable activation and kernel initializer."""

    features: int
    act: Callable = nn.relu
    kernel_init: Callable = nn.initializers.lecun_normal()

    def setup(self):
        self.dense = nn.Dense(self.features, kernel_init=self.kernel_init)

    def __call__(self, inputs):
        return self.act(self.dense(inputs))

    def logits(self, inputs):
        """The pre-activation outputs."""
        return self.dense(inputs)


class WideNet(Net):
    """A Net subclass: inherits `logits` from a user-defined base."""

    features: int = 6


class Mlp(nnx.Module):
    """Two Linear layers and a relu."""

    def __init__(self, din, dout, hidden=4, *, rngs):
        self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, inputs):
        return self.linear2(nnx.relu(self.linear1(inputs)))

    def hidden(self, inputs):
        """The hidden activations."""
        return nnx.relu(self.linear1(inputs))


@keras.saving.register_keras_serializable(package="attack_user_models")
def affine(params, inputs):
    """A plain JAX forward function, registered with Keras, for a JaxLayer."""
    return inputs @ params["w"] + params["b"]


class DropoutMlp(nnx.Module):
    """Linear, dropout (with its own rng stream), Linear."""

    def __init__(self, din, dout, hidden=4, rate=0.1, *, rngs):
        self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, inputs):
        return self.linear2(self.dropout(nnx.relu(self.linear1(inputs))))
