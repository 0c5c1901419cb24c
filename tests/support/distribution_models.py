"""Models used by tests/distribution/test_distribution.py: Linen and NNX modules, plain JAX
functions.

All deterministic (no dropout), so a run on several devices can be compared with a run on one.
`record_sharding` lets a model report the sharding of its inputs as XLA sees them inside the
compiled step (`jax.debug.inspect_array_sharding` calls back at compile time).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

IN_DIM, HIDDEN, OUT_DIM = 4, 16, 2

#: Shardings seen by `record_sharding`; a test clears it before use.
SEEN_INPUT_SHARDINGS: list = []


def record_sharding(x):
    jax.debug.inspect_array_sharding(x, callback=SEEN_INPUT_SHARDINGS.append)


# ------------------------------------------------------------------------------------- Linen


class LinenBNNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense."""

    hidden: int = HIDDEN
    out: int = OUT_DIM
    kernel_init: Any = nn.initializers.lecun_normal()  # of Dense_0

    @nn.compact
    def __call__(self, inputs, training=False):
        record_sharding(inputs)
        x = nn.Dense(self.hidden, kernel_init=self.kernel_init)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        return nn.Dense(self.out)(nn.relu(x))


class LinenPartitioned(nn.Module):
    """Dense_0 annotated with mesh axes (None, "model"); Dense_1 with logical axes
    ("embed", "mlp") if `logical`, else not annotated; Dense_2 not annotated."""

    logical: bool = True

    @nn.compact
    def __call__(self, inputs):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(HIDDEN, kernel_init=nn.with_partitioning(init, (None, "model")))(inputs)
        x = nn.relu(x)
        if self.logical:
            init = nn.with_logical_partitioning(init, ("embed", "mlp"))
        x = nn.Dense(8, kernel_init=init)(x)
        return nn.Dense(OUT_DIM)(nn.relu(x))


class LinenUnknownAxis(nn.Module):
    """Annotated with an axis ("tensor") no test mesh has."""

    @nn.compact
    def __call__(self, inputs):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(HIDDEN, kernel_init=nn.with_partitioning(init, (None, "tensor")))(inputs)
        return nn.Dense(OUT_DIM)(x)


# --------------------------------------------------------------------------------------- NNX


class NNXBNNet(nnx.Module):
    """up -> BatchNorm -> relu -> down; `__call__` takes no `training` (train/eval modes)."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = HIDDEN):
        self.up = nnx.Linear(IN_DIM, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, momentum=0.5, rngs=rngs)
        self.down = nnx.Linear(hidden, OUT_DIM, rngs=rngs)

    def __call__(self, inputs):
        record_sharding(inputs)
        return self.down(nnx.relu(self.bn(self.up(inputs))))


class NNXPartitioned(nnx.Module):
    """Kernels with sharding metadata: up (None, "model"), down ("model", None)."""

    def __init__(self, rngs: nnx.Rngs, up_axes=(None, "model"), down_axes=("model", None)):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            IN_DIM, HIDDEN, kernel_init=nnx.with_partitioning(init, up_axes), rngs=rngs
        )
        self.down = nnx.Linear(
            HIDDEN, OUT_DIM, kernel_init=nnx.with_partitioning(init, down_axes), rngs=rngs
        )

    def __call__(self, inputs):
        return self.down(nnx.relu(self.up(inputs)))


# -------------------------------------------------------------------------------- plain JAX


def mlp_init(rng, inputs):
    """Params for a 2-layer MLP, and state: a running mean of the hidden activations."""
    k1, k2 = jax.random.split(rng)
    d = inputs.shape[-1]
    params = {
        "up": {
            "kernel": jax.random.normal(k1, (d, HIDDEN)) / jnp.sqrt(d),
            "bias": jnp.zeros((HIDDEN,)),
        },
        "down": {
            "kernel": jax.random.normal(k2, (HIDDEN, OUT_DIM)) / jnp.sqrt(HIDDEN),
            "bias": jnp.zeros((OUT_DIM,)),
        },
    }
    return params, {"mean": jnp.zeros((HIDDEN,))}


def mlp_call(params, state, inputs, training):
    record_sharding(inputs)
    h = jax.nn.relu(inputs @ params["up"]["kernel"] + params["up"]["bias"])
    if training:
        state = {"mean": 0.5 * state["mean"] + 0.5 * h.mean(axis=0)}
    h = h - state["mean"]
    return h @ params["down"]["kernel"] + params["down"]["bias"], state
