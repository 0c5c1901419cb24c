"""Flax NNX modules, Variable types and functions used by the tests in tests/nnx (and by the
core tests parametrized by module kind).

Everything is defined at the top level so a saved `.keras` file can name it again.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# --------------------------------------------------------------------------- Variable types


class Count(nnx.Variable):
    """A user-defined (non-Param) Variable type: a counter."""


class Scale(nnx.Param):
    """A subclass of nnx.Param: still trainable."""


# ------------------------------------------------------------------------------------ modules


class MLP(nnx.Module):
    """Linear -> relu -> BatchNorm -> Dropout -> Linear; `__call__` takes no `training`."""

    def __init__(self, din, dout, hidden=8, rate=0.5, *, rngs):
        self.linear1 = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.linear2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, inputs):
        x = nnx.relu(self.linear1(inputs))
        x = self.drop(self.bn(x))
        return self.linear2(x)

    def encode(self, inputs):
        return self.linear1(inputs)

    def encode_with_training(self, inputs, training):
        return self.linear1(inputs) + (1.0 if training else 0.0)

    def takes_extra(self, inputs, scale):
        return self.linear1(inputs) * scale


class BNNet(nnx.Module):
    """Linear -> BatchNorm (no dropout: deterministic in both modes)."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, momentum=0.5, rngs=rngs)

    def __call__(self, inputs):
        return self.bn(self.linear(inputs))


class DropNet(nnx.Module):
    """Linear -> Dropout; the only randomness is the Dropout's rng stream."""

    def __init__(self, din, dout, rate=0.5, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, inputs):
        return self.drop(self.linear(inputs))


class NoiseNet(nnx.Module):
    """Holds an nnx.Rngs and draws from its `noise` stream twice per call."""

    def __init__(self, din, *, rngs):
        self.linear = nnx.Linear(din, din, rngs=rngs)
        self.rngs = rngs

    def __call__(self, inputs):
        a = jax.random.normal(self.rngs.noise(), inputs.shape)
        b = jax.random.normal(self.rngs.noise(), inputs.shape)
        return self.linear(inputs) + a + 2.0 * b


class TrainingNet(nnx.Module):
    """Takes `training`: BN/Dropout follow it, and counters record training and inference calls
    (the twin of models.TrainingRecorder: the same counter names)."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, dout, rngs=rngs)
        self.train_calls = Count(jnp.zeros((), jnp.int32))
        self.infer_calls = Count(jnp.zeros((), jnp.int32))

    def __call__(self, inputs, training):
        if training:
            self.train_calls.value += 1
        else:
            self.infer_calls.value += 1
        x = self.bn(self.linear(inputs), use_running_average=not training)
        x = self.drop(x, deterministic=not training)
        return self.out(x) + (1.0 if training else 0.0)


class VariableKinds(nnx.Module):
    """One of each kind: Param, a Param subclass, BatchStat, a user Variable, a Cache."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.scale = Scale(jnp.ones((dout,)))
        self.bn = nnx.BatchNorm(dout, rngs=rngs)
        self.calls = Count(jnp.zeros((), jnp.int32), note="number of calls")
        self.last_mean = nnx.Cache(jnp.zeros(()))

    def __call__(self, inputs):
        self.calls.value += 1
        self.last_mean.value = jnp.mean(inputs)
        return self.bn(self.linear(inputs)) * self.scale.value


class ListNet(nnx.Module):
    """Submodules held in an nnx.List."""

    def __init__(self, din, dout, *, rngs):
        self.layers = nnx.List([nnx.Linear(din, 4, rngs=rngs), nnx.Linear(4, dout, rngs=rngs)])

    def __call__(self, inputs):
        return self.layers[1](nnx.relu(self.layers[0](inputs)))


class DictNet(nnx.Module):
    """Takes {"a": (B, 3), "b": (B, 2)}; returns a tuple (Linear(a) + Linear(b), {"mean": ...}).

    The twin of models.DictModule.
    """

    def __init__(self, *, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b_proj = nnx.Linear(2, 4, rngs=rngs)

    def __call__(self, inputs):
        h = self.a(inputs["a"]) + self.b_proj(inputs["b"])
        return h, {"mean": jnp.mean(h, axis=-1, keepdims=True)}


class Configured(nnx.Module):
    """Static attributes of every supported kind, used in the computation where possible."""

    def __init__(
        self,
        din,
        dout,
        *,
        rngs,
        sizes=(6, 5),
        tag="configured",
        activation=jax.nn.gelu,
        dtype=jnp.float32,
    ):
        self.din = din
        self.sizes = sizes
        self.tag = tag
        self.activation = activation
        self.compute_dtype = dtype
        self.init_fn = nnx.initializers.normal(0.02)
        self.other_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        self.hidden = nnx.Linear(
            din, sizes[0], kernel_init=nnx.initializers.normal(0.5), dtype=dtype, rngs=rngs
        )
        self.out = nnx.Linear(sizes[0], dout, dtype=dtype, rngs=rngs)
        self.offset = nnx.Param(self.init_fn(rngs.params(), (dout,)))

    def __call__(self, inputs):
        x = self.activation(self.hidden(inputs.astype(self.compute_dtype)))
        return self.out(x) + self.offset.value


class SharedNet(nnx.Module):
    """The same Linear reachable from two attributes."""

    def __init__(self, din, *, rngs):
        shared = nnx.Linear(din, din, rngs=rngs)
        self.first = shared
        self.second = shared
        self.head = nnx.Linear(din, 2, rngs=rngs)

    def __call__(self, inputs):
        return self.head(self.second(nnx.relu(self.first(inputs))))


class Opaque:
    """An arbitrary object that cannot be saved."""


class WithLambda(nnx.Module):
    def __init__(self, din, *, rngs):
        self.linear = nnx.Linear(din, 2, rngs=rngs)
        self.post = lambda x: x * 2.0

    def __call__(self, inputs):
        return self.post(self.linear(inputs))


class WithObject(nnx.Module):
    def __init__(self, din, *, rngs):
        self.linear = nnx.Linear(din, 2, rngs=rngs)
        self.helper = Opaque()

    def __call__(self, inputs):
        return self.linear(inputs)


# ------------------------------------------------------------------------------- for bridges


class LinenMLP(nn.Module):
    """A Linen module (for nnx.bridge.ToNNX)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(2)(x)


class SimpleNNX(nnx.Module):
    """An NNX module built from args (for nnx.bridge.ToLinen)."""

    def __init__(self, din, dout, *, rngs):
        self.linear1 = nnx.Linear(din, 8, rngs=rngs)
        self.linear2 = nnx.Linear(8, dout, rngs=rngs)

    def __call__(self, x):
        return self.linear2(nnx.relu(self.linear1(x)))


# ------------------------------------------------------------------------------- functions


def double_encode(module, inputs):
    """A `method` function whose first argument is the module."""
    return module.encode(inputs) * 2.0


def encode_training(module, training, inputs):
    return module.encode_with_training(inputs, training)


class AttentionNet(nnx.Module):
    """nnx.MultiHeadAttention: its LinearGeneral submodules hold FrozenDict attributes."""

    def __init__(self, features: int = 4, *, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=features, decode=False, rngs=rngs
        )

    def __call__(self, inputs):
        return self.attention(inputs)
