"""Keras's NNX mode (`KERAS_NNX_ENABLED=true`, JAX backend): FlaxLayer (Linen and NNX modules)
builds, fits, saves and loads, and a Keras model holding one trains in a hand-written
`nnx.Optimizer` + `nnx.jit` loop, as in Keras's NNX guide, updating every variable.

The mode is chosen before Keras is imported, so the checks run in a fresh process."""

import keras
import pytest

from helpers import run_python_json

SCRIPT = """
import os
os.environ["KERAS_NNX_ENABLED"] = "true"
import jax.numpy as jnp, keras, numpy as np, optax
from flax import nnx
from backend_models import ConvBN, NNXNet
from flaxlayer import FlaxLayer

assert keras.config.is_nnx_enabled()
rng = np.random.default_rng(0)
results = {{}}
for kind in ("linen", "nnx"):
    if kind == "linen":
        x = rng.random((8, 6, 6, 1), dtype="float32")
        make = lambda: FlaxLayer(ConvBN(), name="flax")
    else:
        x = rng.random((8, 5), dtype="float32")
        make = lambda: FlaxLayer(NNXNet(5, 3, rngs=nnx.Rngs(0)), name="flax")
    y = rng.random((8, 2), dtype="float32")

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.flax, self.head = make(), keras.layers.Dense(2, name="head")

        def call(self, inputs, training=False):
            return self.head(self.flax(inputs, training=training))

    # fit, save, load
    model = keras.Sequential([keras.Input(x.shape[1:]), make(), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = os.path.join({tmp!r}, kind + ".keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    same = np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    # Keras's NNX guide: nnx.Optimizer over the model's Keras variables, nnx.jit'ed step.
    model = Model()
    model(x)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Variable)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x, training=True) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Variable))(model)
        optimizer.update(model, grads)
        return loss

    before = {{v.path: np.array(v.value) for v in model.trainable_variables}}
    step(model, optimizer, x, y)
    after = {{v.path: np.array(v.value) for v in model.trainable_variables}}
    results[kind] = {{
        "loaded_equal": bool(same),
        "unchanged": sorted(p for p in before if np.allclose(before[p], after[p])),
        "flax_variables": len([p for p in before if "/flax/" in p]),
    }}
report(results)
"""


def test_flax_layer_in_keras_nnx_mode(tmp_path):
    if keras.backend.backend() != "jax":
        pytest.skip("Keras's NNX mode exists on the JAX backend only")
    results = run_python_json(SCRIPT.format(tmp=str(tmp_path)), backend="jax")
    for kind, result in results.items():
        assert result["loaded_equal"], kind
        assert result["flax_variables"] >= 4, kind
        # Every trainable variable moves, but a bias feeding BatchNorm (zero gradient).
        assert len(result["unchanged"]) <= 1, (kind, result["unchanged"])
