"""Orbax checkpoints: `keras.callbacks.OrbaxCheckpoint` around a model holding a FlaxLayer, a
pure-Flax Orbax checkpoint (a Linen `TrainState` with batch statistics, an NNX state) restored
into a new FlaxLayer through `variables=`, and `layer.flax_variables` saved with Orbax and
restored into pure Flax."""

import jax
import keras
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state

from backend_models import ConvBN, NNXNet
from flaxlayer import FlaxLayer
from helpers import to_numpy

X = np.random.default_rng(0).random((8, 6, 6, 1), dtype="float32")
Y = np.random.default_rng(1).random((8, 3), dtype="float32")


def _model():
    return keras.Sequential([keras.Input((6, 6, 1)), FlaxLayer(ConvBN(), name="f")], name="m")


def test_orbax_checkpoint_callback_resumes_training_exactly(tmp_path):
    """Training 2 epochs, or 1 epoch, a restore into a rebuilt model, then 1 more epoch,
    ends with equal weights and optimizer step."""
    directory = str(tmp_path / "ckpt")

    def compiled():
        model = _model()
        model.compile(keras.optimizers.Adam(0.01), "mse")
        return model

    keras.utils.set_random_seed(0)
    straight = compiled()
    straight.fit(X, Y, epochs=2, batch_size=4, shuffle=False, verbose=0)

    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    first = compiled()
    saver = keras.callbacks.OrbaxCheckpoint(directory, save_on_background=False)
    first.fit(X, Y, epochs=1, batch_size=4, shuffle=False, verbose=0, callbacks=[saver])
    expected = [to_numpy(w).copy() for w in first.weights]

    keras.backend.clear_session(free_memory=False)  # a new process would build the same names
    resumed = compiled()
    resumed.build((None, 6, 6, 1))
    resumed.optimizer.build(resumed.trainable_variables)
    resumed.load_weights(directory)
    for got, want in zip(resumed.weights, expected, strict=True):
        np.testing.assert_array_equal(to_numpy(got), want)
    assert int(to_numpy(resumed.optimizer.iterations)) == 2
    resumed.fit(X, Y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    for got, want in zip(resumed.weights, straight.weights, strict=True):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), atol=1e-6)


def test_linen_train_state_checkpoint_restores_through_variables(tmp_path):
    module = ConvBN()
    variables = module.init(jax.random.PRNGKey(3), X, training=False)
    state = train_state.TrainState.create(
        apply_fn=module.apply, params=variables["params"], tx=optax.adam(1e-3)
    )
    checkpoint = {"state": state, "batch_stats": variables["batch_stats"]}
    path = tmp_path / "flax_ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, checkpoint)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)  # plain dicts, as written

    # The one call: the collections Flax's `init` returns, from the checkpoint's entries.
    layer = FlaxLayer(
        ConvBN(),
        variables={"params": restored["state"]["params"], "batch_stats": restored["batch_stats"]},
    )
    expected = module.apply(variables, X, training=False)
    np.testing.assert_allclose(to_numpy(layer(X)), expected, atol=1e-5)


def test_nnx_state_checkpoint_restores_through_variables(tmp_path):
    trained = NNXNet(5, 3, rngs=nnx.Rngs(7))
    x = np.random.default_rng(2).random((4, 5), dtype="float32")
    trained.eval()
    expected = trained(x)
    path = tmp_path / "nnx_ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(trained))

    module = NNXNet(5, 3, rngs=nnx.Rngs(0))  # another init, as a new process would make
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, nnx.eval_shape(lambda: nnx.state(module)))
    layer = FlaxLayer(module, variables=restored)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)


def test_flax_variables_saved_with_orbax_restore_into_pure_flax(tmp_path):
    model = _model()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(X, Y, epochs=1, batch_size=4, verbose=0)
    layer = model.layers[0]
    path = tmp_path / "from_keras"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, layer.flax_variables)
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path)
    out = ConvBN().apply(variables, X, training=False)
    np.testing.assert_allclose(out, to_numpy(model.predict(X, verbose=0)), atol=1e-5)
