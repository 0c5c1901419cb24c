"""One small model per module kind for the fine-tuning tests: a conv (an N-D kernel), batch
statistics (state), a backbone Dense and a head Dense, on (N, 6, 6, 1) inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
from flax import nnx

from flaxlayer import FlaxLayer, JaxLayer


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(8, name="backbone")(x))
        return nn.Dense(3, name="head")(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.backbone = nnx.Linear(144, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x))).reshape((x.shape[0], -1))
        return self.head(nnx.relu(self.backbone(x)))


@keras.saving.register_keras_serializable(package="finetune_models")
def net_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    return {
        "backbone": {"kernel": jax.random.normal(k1, (36, 8)) * 0.2, "bias": jnp.zeros(8)},
        "head": {"kernel": jax.random.normal(k2, (8, 3)) * 0.3, "bias": jnp.zeros(3)},
    }


@keras.saving.register_keras_serializable(package="finetune_models")
def net_call(params, inputs):
    x = inputs.reshape((inputs.shape[0], -1))
    x = jax.nn.relu(x @ params["backbone"]["kernel"] + params["backbone"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


#: name -> (make a layer, the path prefix of its params in describe())
KINDS = {
    "linen": (lambda: FlaxLayer(LinenNet(), name="net"), "params/"),
    "nnx": (lambda: FlaxLayer(NNXNet(nnx.Rngs(0)), name="net"), ""),
    "jax": (lambda: JaxLayer(net_call, net_init, name="net"), "params/"),
}
