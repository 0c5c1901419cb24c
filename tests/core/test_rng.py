"""rng streams at init, per training call, at inference; reproducibility.

Behaviours that hold for Linen and NNX alike are one test parametrized by module kind: a Linen
`DenseDropout` and an NNX `DropNet` (Dense/Linear 3 -> 16, then dropout 0.5), or a Linen and an
NNX `MLP` for `fit`. The NNX-only ones (rngs held by the module, modes) are in
test_nnx_rng_training.py.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import nnx_models
from core_models import MLP, AugmentModule, DenseDropout, NoiseModule
from flaxlayer import FlaxLayer
from helpers import flax_inference, to_numpy, weight_named
from sample_data import make_data, normal_data

KINDS = {"linen": DenseDropout, "nnx": lambda: nnx_models.DropNet(3, 16, rngs=nnx.Rngs(0))}
MLPS = {"linen": MLP, "nnx": lambda: nnx_models.MLP(3, 2, rngs=nnx.Rngs(0))}

X = np.ones((4, 16), "float32")


def test_init_gets_custom_stream_key():
    class InitNoise(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            # Asks for "noise" and "dropout" keys at init time.
            offset = self.variable(
                "consts",
                "offset",
                lambda: jnp.concatenate(
                    [
                        nn.initializers.normal(1.0)(self.make_rng("noise"), (2,)),
                        nn.initializers.normal(1.0)(self.make_rng("dropout"), (2,)),
                    ]
                ),
            )
            return nn.Dense(4)(inputs) + offset.value

    layer = FlaxLayer(InitNoise())
    out = to_numpy(layer(np.ones((2, 3), "float32")))
    assert out.shape == (2, 4)
    offset = to_numpy(layer.state["consts"]["offset"])
    assert np.all(offset != 0.0)


def test_stream_used_at_inference_gets_fresh_keys():
    layer = FlaxLayer(NoiseModule())
    model = keras.Sequential([keras.Input((16,)), layer])
    p1 = model.predict(X, verbose=0)
    p2 = model.predict(X, verbose=0)
    assert p1.shape == (4, 3)
    assert not np.allclose(p1, p2)
    c1, c2 = to_numpy(layer(X)), to_numpy(layer(X))
    assert not np.allclose(c1, c2)
    # Same noise key for every row? No: rows of one call differ too.
    assert not np.allclose(c1[0], c1[1])


def test_stream_used_at_inference_in_fit_and_evaluate():
    x, y = make_data(n=16, in_dim=16, out_dim=3)
    model = keras.Sequential([keras.Input((16,)), FlaxLayer(NoiseModule())])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    e1 = model.evaluate(x, y, verbose=0)
    e2 = model.evaluate(x, y, verbose=0)
    assert e1 != e2


def test_training_only_custom_stream_gets_fresh_keys():
    layer = FlaxLayer(AugmentModule())
    inference = to_numpy(layer(X))
    np.testing.assert_allclose(inference, to_numpy(layer(X)))  # deterministic at inference
    t1, t2 = to_numpy(layer(X, training=True)), to_numpy(layer(X, training=True))
    assert not np.allclose(t1, t2)
    assert not np.allclose(t1, inference)


def test_training_only_custom_stream_in_fit():
    x, y = make_data(n=16, in_dim=16, out_dim=3)
    model = keras.Sequential([keras.Input((16,)), FlaxLayer(AugmentModule())])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    p1, p2 = model.predict(x, verbose=0), model.predict(x, verbose=0)
    np.testing.assert_allclose(p1, p2)


# NNX dropout draws keys of the type its Rngs holds: rbg keys too.
KEY_KINDS = {
    **KINDS,
    "nnx-rbg-keys": lambda: nnx_models.DropNet(
        3, 16, rngs=nnx.Rngs(0, dropout=jax.random.key(1, impl="rbg"))
    ),
}


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_new_dropout_mask_each_training_call(kind):
    layer = FlaxLayer(KEY_KINDS[kind]())
    x = normal_data(8)
    # Inference is deterministic, Flax's own output, and drops nothing.
    inference = to_numpy(layer(x))
    np.testing.assert_array_equal(to_numpy(layer(x)), inference)
    np.testing.assert_allclose(inference, flax_inference(layer, x), rtol=1e-5, atol=1e-6)
    assert np.all(inference != 0.0)
    outs = [to_numpy(layer(x, training=True)) for _ in range(3)]
    for a, b in itertools.combinations(outs, 2):
        assert not np.allclose(a, b)  # a new mask at every call
    for out in outs:
        # Each unit is dropped (0) or kept and scaled by 1 / (1 - rate) = 2; about half dropped.
        kept = out != 0.0
        np.testing.assert_allclose(out[kept], 2.0 * inference[kept], rtol=1e-5, atol=1e-6)
        assert 0.2 < np.mean(~kept) < 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_new_dropout_mask_each_fit_step(kind):
    """Same batch, zero learning rate: the per-step losses differ only through dropout."""
    losses = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(KINDS[kind]())])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = make_data(n=8, out_dim=16)
    model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=[callback])
    assert len(losses) == 3
    assert len(set(losses)) == 3


def _training_run(make, seed=None):
    """A new layer (the session cleared first): its kernel and two training outputs."""
    keras.backend.clear_session(free_memory=False)
    layer = FlaxLayer(make(), seed=seed)
    x = normal_data(8)
    first = to_numpy(layer(x, training=True))
    second = to_numpy(layer(x, training=True))
    return to_numpy(weight_named(layer, "kernel")), first, second


def _assert_reproduced(a, b, other, kind):
    """`b` repeats run `a` (same seed); `other` (another seed) does not."""
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a[1], a[2])  # new keys at each call
    assert not np.allclose(a[1], other[1])
    if kind == "linen":  # a Linen layer initializes its module from the seed; NNX ones come built
        assert not np.allclose(a[0], other[0])


# An NNX module that holds an nnx.Rngs and draws from it itself: the seed reaches it too.
SEED_KINDS = {
    **KINDS,
    "nnx-rngs-in-module": lambda: nnx_models.NoiseNet(3, rngs=nnx.Rngs(0, noise=1)),
}


@pytest.mark.parametrize("kind", SEED_KINDS)
def test_set_random_seed_reproducible(kind):
    runs = []
    for seed in (123, 123, 124):
        keras.utils.set_random_seed(seed)
        runs.append(_training_run(SEED_KINDS[kind]))
    _assert_reproduced(*runs, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_seed_argument_reproducible(kind):
    a, b, other = (_training_run(KINDS[kind], seed=seed) for seed in (7, 7, 8))
    _assert_reproduced(a, b, other, kind)


@pytest.mark.parametrize("kind", MLPS)
def test_seed_reproducible_fit(kind):
    x, y = make_data(n=16)

    def run(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLPS[kind]())])
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
        return model, history.history["loss"], [to_numpy(v) for v in model.weights]

    (model_a, loss_a, weights_a), (model_b, loss_b, weights_b) = run(5), run(5)
    assert loss_a == loss_b
    for u, v in zip(weights_a, weights_b, strict=True):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(model_a.predict(x, verbose=0), model_b.predict(x, verbose=0))
    weights_other = run(6)[2]
    assert any(not np.array_equal(u, w) for u, w in zip(weights_a, weights_other, strict=True))


def test_no_key_drawn_where_the_module_does_not_use_one():
    """An NNX Dropout takes its key in both modes but uses it in training only: inference
    leaves the layer's seed where it was, training advances it. A module that does use its
    key at inference (a noise stream) still gets a fresh one each call."""
    layer = FlaxLayer(nnx_models.DropNet(4, 3, rngs=nnx.Rngs(0)), seed=1)
    x = np.ones((2, 4), "float32")
    layer(x)
    seed = to_numpy(layer.seed_generator.state)
    layer(x, training=False)
    np.testing.assert_array_equal(to_numpy(layer.seed_generator.state), seed)
    layer(x, training=True)
    assert not np.array_equal(to_numpy(layer.seed_generator.state), seed)

    noisy = FlaxLayer(nnx_models.NoiseNet(4, rngs=nnx.Rngs(0)), seed=1)
    first, second = to_numpy(noisy(x)), to_numpy(noisy(x))
    assert not np.allclose(first, second)
