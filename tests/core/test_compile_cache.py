"""Eager calls reuse one compiled function per input signature.

Outside Keras's compiled steps, `layer(x)` runs a function compiled once per (input
shapes/dtypes/structure, training). These tests count how often the wrapped model's Python code
runs (and how often with tracers as inputs, i.e. traced) and how often JAX traces, lowers or
compiles anything, across repeated eager calls with the same signature and after a new input
shape. A cached call runs no model Python at all; a model run op by op (no compilation) would run
it on every call. The tests run on every Keras backend (`KERAS_BACKEND`): each bridge must cache
per signature.

The first call on a fresh layer is not counted: building (`plan`, `init`) and Keras's own
`compute_output_spec` trace the model several times by design.
"""

import flax.linen as nn
import jax
import jax.monitoring
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import flaxlayer

RUNS = {"python": 0, "traced": 0}
# JAX reports tracing to a jaxpr, lowering to MLIR and XLA compilation under this prefix.
COMPILE_EVENTS = "/jax/core/compile/"
N_CALLS = 10


def _count_run(inputs):
    """Counts every run of the model's Python code, and separately the traced ones."""
    RUNS["python"] += 1
    if isinstance(inputs, jax.core.Tracer):
        RUNS["traced"] += 1


def _reset_runs():
    RUNS.update(python=0, traced=0)


class CountingLinen(nn.Module):
    """Dense + BatchNorm + Dropout: params, state and an rng stream."""

    @nn.compact
    def __call__(self, inputs, training):
        _count_run(inputs)
        x = nn.Dense(4)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        return nn.Dropout(rate=0.5, deterministic=not training)(x)


class CountingNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, inputs):
        _count_run(inputs)
        return self.drop(self.norm(self.dense(inputs)))


def counting_call_fn(params, state, rng, inputs, training):
    _count_run(inputs)
    out = inputs @ params["w"]
    if training:
        keep = jax.random.bernoulli(rng, 0.5, out.shape)
        out = jnp.where(keep, out * 2.0, 0.0)
        state = {"calls": state["calls"] + 1}
    return out, state


def counting_init_fn(rng, inputs):
    params = {"w": jax.random.normal(rng, (inputs.shape[-1], 4))}
    return params, {"calls": jnp.zeros((), jnp.int32)}


MAKERS = {
    "linen": lambda: flaxlayer.FlaxLayer(CountingLinen()),
    "nnx": lambda: flaxlayer.FlaxLayer(CountingNNX(nnx.Rngs(0))),
    "jax_layer": lambda: flaxlayer.JaxLayer(counting_call_fn, counting_init_fn),
}


class CompileCounter:
    """Counts JAX's tracing, lowering and compilation events, whatever function they are for.

    A cached eager call reaches an already compiled executable: no event at all. (On the
    TensorFlow backend this also catches re-exporting the jax2tf module on every call.)
    """

    def __init__(self):
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    def __call__(self, event, duration, **kwargs):
        if event.startswith(COMPILE_EVENTS):
            self.events.append(event)

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _state_values(layer) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in layer.non_trainable_weights]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_eager_calls_trace_once_per_signature(kind, training):
    layer = MAKERS[kind]()
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    layer(x, training=training)  # builds: traces for plan/init/output spec are expected

    _reset_runs()
    with CompileCounter() as compiles:
        for _ in range(N_CALLS):
            layer(x, training=training)
    assert RUNS["python"] == 0, f"{N_CALLS} eager calls, same signature: model Python ran"
    assert compiles.count == 0, (
        f"{N_CALLS} eager calls, same signature: JAX traced/lowered/compiled again "
        f"({compiles.count} events: {sorted(set(compiles.events))})"
    )

    y = np.random.default_rng(1).normal(size=(7, 3)).astype("float32")
    layer(y, training=training)
    assert RUNS == {"python": 1, "traced": 1}, "a new input shape must trace exactly once more"
    for _ in range(N_CALLS):
        layer(y, training=training)
        layer(x, training=training)
    assert RUNS == {"python": 1, "traced": 1}, "both signatures stay cached"


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_cached_calls_still_draw_fresh_rng_and_update_state(kind):
    """The cache keeps what makes eager calls differ: a new key and new state every call."""
    layer = MAKERS[kind]()
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    layer(x, training=True)
    before = _state_values(layer)
    first = keras.ops.convert_to_numpy(layer(x, training=True))
    second = keras.ops.convert_to_numpy(layer(x, training=True))
    after = _state_values(layer)
    assert not np.array_equal(first, second), "two training calls gave the same dropout mask"
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), (
        "the state was not written back"
    )
    # Inference is deterministic and leaves the state alone.
    a = keras.ops.convert_to_numpy(layer(x, training=False))
    b = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_array_equal(a, b)
    for old, new in zip(after, _state_values(layer), strict=True):
        np.testing.assert_array_equal(old, new)
