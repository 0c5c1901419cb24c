"""Flax Linen modules of the core tests, also used by the saving tests (top level, so that a
saved model finds them again by name)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class MyFlaxModule(nn.Module):
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


class TwoInputModule(nn.Module):
    """The seed's second example, with a real `forward` body."""

    hidden: int = 8

    @nn.compact
    def forward(self, input1, input2, deterministic):
        x = jnp.concatenate([input1, input2], axis=-1)
        x = nn.Dense(self.hidden)(x)
        x = nn.relu(x)
        x = nn.Dropout(rate=0.5, deterministic=deterministic)(x)
        outputs = nn.Dense(2)(x)
        return outputs


def my_flax_module_wrapper(module, inputs, training):
    input1, input2 = inputs
    return module.forward(input1, input2, not training)


class MLP(nn.Module):
    """Dense + BatchNorm + Dropout, taking `training`."""

    hidden: int = 8
    out: int = 2
    rate: float = 0.5

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(self.hidden)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        x = nn.relu(x)
        x = nn.Dropout(rate=self.rate, deterministic=not training)(x)
        return nn.Dense(self.out)(x)


class BatchNormModule(nn.Module):
    """Dense + BatchNorm, no randomness."""

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(4)(inputs)
        return nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)


class DenseDropout(nn.Module):
    """Dense -> Dropout; the only randomness is the dropout rng (twin of nnx_models.DropNet)."""

    features: int = 16
    rate: float = 0.5

    @nn.compact
    def __call__(self, inputs, training):
        return nn.Dropout(self.rate, deterministic=not training)(nn.Dense(self.features)(inputs))


class SowModule(nn.Module):
    """Sows into "intermediates" and into a custom "debug" collection on every call."""

    @nn.compact
    def __call__(self, inputs, training):
        h = nn.Dense(4)(inputs)
        self.sow("intermediates", "hidden", h)
        self.sow("debug", "mean", jnp.mean(h))
        return nn.Dense(2)(nn.relu(h))


class ConstantLossModule(nn.Module):
    """Outputs zeros (shape (batch, 2)) and sows the losses 2.0 and 3.0 (sum 5.0)."""

    training_only: bool = False

    @nn.compact
    def __call__(self, inputs, training):
        out = nn.Dense(2)(inputs) * 0.0
        if training or not self.training_only:
            self.sow("losses", "two", jnp.float32(2.0))
            self.sow("losses", "three", jnp.float32(3.0))
        return out


class NoiseModule(nn.Module):
    """Uses a custom rng stream "noise" at inference and in training."""

    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(3)(inputs)
        noise = jax.random.normal(self.make_rng("noise"), x.shape, x.dtype)
        return x + noise


class AugmentModule(nn.Module):
    """Uses a custom rng stream "augment" in training only (no dropout)."""

    @nn.compact
    def __call__(self, inputs, training):
        if training:
            inputs = inputs + jax.random.normal(self.make_rng("augment"), inputs.shape)
        return nn.Dense(3)(inputs)


class EncoderModule(nn.Module):
    """A module with `encode`, `decode` and `__call__` methods."""

    def setup(self):
        self.enc = nn.Dense(4)
        self.dec = nn.Dense(3)

    def encode(self, inputs):
        return self.enc(inputs)

    def decode(self, inputs, training):
        return self.dec(inputs) + (1.0 if training else 0.0)

    def takes_extra(self, inputs, scale):
        return self.enc(inputs) * scale

    def __call__(self, inputs):
        return self.dec(self.encode(inputs))


class TrainingRecorder(nn.Module):
    """Counts training and inference calls in a "counters" collection; output = Dense(x).

    The twin of nnx_models.TrainingNet: the same counter names.
    """

    @nn.compact
    def __call__(self, inputs, training):
        train_calls = self.variable("counters", "train_calls", lambda: jnp.zeros((), jnp.int32))
        infer_calls = self.variable("counters", "infer_calls", lambda: jnp.zeros((), jnp.int32))
        if not self.is_initializing():
            if training:
                train_calls.value += 1
            else:
                infer_calls.value += 1
        return nn.Dense(2)(inputs)


class TrainingFlagModule(nn.Module):
    """Output is `inputs * 0 + training` (plus a zeroed Dense so there is something to train)."""

    @nn.compact
    def __call__(self, inputs, training):
        return nn.Dense(inputs.shape[-1])(inputs) * 0.0 + jnp.float32(training)


class DictModule(nn.Module):
    """Takes {"a": (B, 3), "b": (B, 2)}; returns a tuple (Dense(a) + Dense(b), {"mean": ...}).

    The twin of nnx_models.DictNet.
    """

    @nn.compact
    def __call__(self, inputs):
        h = nn.Dense(4)(inputs["a"]) + nn.Dense(4, name="b_proj")(inputs["b"])
        return h, {"mean": jnp.mean(h, axis=-1, keepdims=True)}
