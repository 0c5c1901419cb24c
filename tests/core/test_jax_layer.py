"""JaxLayer: hand-written JAX models (params, state, rng), argument contracts and errors."""

import gc
import inspect

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from flaxlayer import JaxLayer
from helpers import to_numpy
from sample_data import make_data

# ----------------------------------------------------------------------- a plain JAX MLP


def mlp_init(rng, inputs):
    k1, k2 = jax.random.split(rng)
    d = inputs.shape[-1]
    return {
        "hidden": {"w": jax.random.normal(k1, (d, 8)) * 0.3, "b": jnp.zeros(8)},
        "out": {"w": jax.random.normal(k2, (8, 2)) * 0.3, "b": jnp.zeros(2)},
    }


def mlp_call(params, inputs):
    h = jax.nn.relu(inputs @ params["hidden"]["w"] + params["hidden"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def test_mlp_params_paths_and_fit():
    x, y = make_data(n=16)
    layer = JaxLayer(mlp_call, mlp_init)
    model = keras.Sequential([keras.Input((3,)), layer])
    assert {w.path for w in layer.weights} == {
        "sequential/jax_layer/params/hidden/w",
        "sequential/jax_layer/params/hidden/b",
        "sequential/jax_layer/params/out/w",
        "sequential/jax_layer/params/out/b",
    }
    assert layer.params["hidden"]["w"].path.endswith("jax_layer/params/hidden/w")
    assert tuple(layer.params["hidden"]["w"].shape) == (3, 8)
    assert len(layer.trainable_weights) == 4
    assert model.count_params() == 3 * 8 + 8 + 8 * 2 + 2

    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    before = to_numpy(layer.params["out"]["w"]).copy()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert not np.allclose(to_numpy(layer.params["out"]["w"]), before)

    values = jax.tree.map(lambda v: jnp.asarray(to_numpy(v)), layer.params)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np.asarray(mlp_call(values, x)), rtol=1e-5, atol=1e-6
    )


def test_standalone_path_and_build_from_shape():
    layer = JaxLayer(mlp_call, mlp_init)
    layer.build((None, 5))
    assert layer.params["out"]["b"].path == "jax_layer/params/out/b"
    assert tuple(layer.params["hidden"]["w"].shape) == (5, 8)


def test_argument_order_is_irrelevant():
    def call_fn(inputs, params):
        return inputs @ params["w"]

    def init_fn(inputs, rng):
        return {"w": jax.random.normal(rng, (inputs.shape[-1], 2))}

    layer = JaxLayer(call_fn, init_fn)
    x = np.ones((4, 3), "float32")
    out = to_numpy(layer(x))
    np.testing.assert_allclose(out, x @ to_numpy(layer.params["w"]), rtol=1e-6)


def test_init_fn_sees_unknown_dims_as_one():
    seen = []

    def init_fn(inputs):
        seen.append(tuple(inputs.shape))
        return {"w": jnp.ones((inputs.shape[-1], 2))}

    def call_fn(params, inputs):
        return inputs @ params["w"]

    layer = JaxLayer(call_fn, init_fn)
    out = layer(keras.Input((None, 3)))
    assert tuple(out.shape) == (None, None, 2)
    assert (1, 1, 3) in seen


def test_params_given_without_init_fn():
    w = np.arange(6, dtype="float32").reshape(3, 2)

    def call_fn(params, inputs):
        return inputs @ params["w"]

    layer = JaxLayer(call_fn, params={"w": w})
    x = np.ones((4, 3), "float32")
    np.testing.assert_allclose(to_numpy(layer(x)), x @ w)
    assert layer.params["w"].path == "jax_layer/params/w"
    assert layer.params["w"].trainable


def test_given_params_mismatch_named():
    def call_fn(params, inputs):
        return inputs @ params["w"]

    def init_fn(inputs):
        return {"w": jnp.zeros((inputs.shape[-1], 2))}

    layer = JaxLayer(call_fn, init_fn, params={"w": np.zeros((5, 2), "float32")}, name="given")
    with pytest.raises(ValueError) as info:
        layer(np.ones((4, 3), "float32"))
    message = str(info.value)
    assert "params/w" in message
    assert "(3, 2)" in message
    assert "(5, 2)" in message
    assert "given" in message


def test_call_fn_without_params_has_no_weights():
    layer = JaxLayer(lambda inputs: inputs * 2.0)
    np.testing.assert_allclose(to_numpy(layer(np.ones((2, 3), "float32"))), 2.0)
    assert layer.weights == [] or all("seed_generator" in w.path for w in layer.weights)


# ------------------------------------------------------------------------------ with state


def counter_init(inputs):
    params = {"scale": jnp.ones(())}
    state = {"count": jnp.zeros((), jnp.int32), "mean": jnp.zeros((inputs.shape[-1],))}
    return params, state


def counter_call(params, state, inputs, training):
    if training:
        state = {
            "count": state["count"] + 1,
            "mean": 0.5 * state["mean"] + 0.5 * jnp.mean(inputs, axis=0),
        }
    return (inputs - state["mean"]) * params["scale"], state


def test_state_updated_only_in_training():
    x, _ = make_data(n=16)
    x = x + 3.0
    layer = JaxLayer(counter_call, counter_init)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    state_paths = {w.path for w in layer.non_trainable_weights if "/state/" in w.path}
    assert state_paths == {"sequential/jax_layer/state/count", "sequential/jax_layer/state/mean"}
    assert not layer.state["count"].trainable
    assert not layer.state["mean"].trainable
    assert {w.path for w in layer.trainable_weights} == {"sequential/jax_layer/params/scale"}

    model.fit(x, np.zeros((16, 3), "float32"), epochs=1, batch_size=8, verbose=0)
    assert int(to_numpy(layer.state["count"])) == 2
    mean = to_numpy(layer.state["mean"]).copy()
    assert not np.allclose(mean, 0.0)

    model.predict(x, verbose=0)
    model.evaluate(x, np.zeros((16, 3), "float32"), verbose=0)
    layer(x)
    assert int(to_numpy(layer.state["count"])) == 2
    np.testing.assert_array_equal(to_numpy(layer.state["mean"]), mean)

    layer(x, training=True)
    assert int(to_numpy(layer.state["count"])) == 3


def test_state_given_without_init_fn():
    layer = JaxLayer(
        counter_call,
        params={"scale": np.float32(2.0)},
        state={"count": np.int32(10), "mean": np.ones(3, "float32")},
    )
    x = np.full((2, 3), 3.0, "float32")
    np.testing.assert_allclose(to_numpy(layer(x)), 4.0)
    layer(x, training=True)
    assert int(to_numpy(layer.state["count"])) == 11


def test_call_fn_with_state_must_return_pair():
    def call_fn(state, inputs):
        return inputs

    layer = JaxLayer(call_fn, state={"n": np.zeros((), "float32")}, name="pairless")
    with pytest.raises(ValueError, match=r"\(outputs, new_state\)"):
        layer(np.ones((2, 3), "float32"))


def test_init_fn_with_state_must_return_pair():
    def call_fn(params, state, inputs):
        return inputs, state

    def init_fn(inputs):
        return {"w": jnp.ones(())}

    layer = JaxLayer(call_fn, init_fn)
    with pytest.raises(ValueError, match=r"\(params, state\)"):
        layer(np.ones((2, 3), "float32"))


# -------------------------------------------------------------------------------- with rng


def dropout_call(params, rng, inputs, training):
    h = inputs @ params["w"]
    if training:
        keep = jax.random.bernoulli(rng, 0.5, h.shape)
        h = jnp.where(keep, h / 0.5, 0.0)
    return h


def dropout_init(rng, inputs):
    return {"w": jax.random.normal(rng, (inputs.shape[-1], 16))}


def test_rng_fresh_each_training_call():
    layer = JaxLayer(dropout_call, dropout_init)
    x = np.ones((4, 8), "float32")
    inference = to_numpy(layer(x))
    np.testing.assert_allclose(inference, to_numpy(layer(x)))
    t1, t2 = to_numpy(layer(x, training=True)), to_numpy(layer(x, training=True))
    assert not np.array_equal(t1 == 0, t2 == 0)


def test_rng_reproducible_with_seed():
    x = np.ones((4, 8), "float32")

    def run(seed):
        keras.backend.clear_session(free_memory=False)
        layer = JaxLayer(dropout_call, dropout_init, seed=seed)
        return to_numpy(layer.__call__(x, training=True)), to_numpy(layer.params["w"])

    a, b, c = run(3), run(3), run(4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], c[1])


def test_call_fn_drawing_rng_trains_with_fit():
    x, y = make_data(n=16, in_dim=8, out_dim=16)
    model = keras.Sequential([keras.Input((8,)), JaxLayer(dropout_call, dropout_init)])
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ------------------------------------------------------------------------------- errors


def test_call_fn_argument_no_rule_fills_raises_at_the_call_with_both_fixes():
    def my_call(params, inputs, mode):
        return inputs

    layer = JaxLayer(my_call, params={"w": np.zeros(2)}, name="bad_call")
    with pytest.raises(ValueError) as info:
        layer(np.zeros((2, 2), "float32"))
    message = str(info.value)
    assert "my_call" in message
    assert "`mode`" in message
    assert "call_fn" in message
    assert "bad_call" in message
    assert "{'inputs': ..., 'mode': ...}" in message


def test_init_fn_argument_no_rule_fills_raises_at_the_build():
    def my_init(key, inputs):
        return {}

    layer = JaxLayer(mlp_call, my_init)
    with pytest.raises(ValueError) as info:
        layer(np.zeros((2, 3), "float32"))
    message = str(info.value)
    assert "my_init" in message
    assert "key" in message
    assert "init_fn" in message
    assert "JaxLayer 'jax_layer'" in message


def test_init_fn_may_not_take_params():
    def init_fn(params, inputs):
        return {}

    with pytest.raises(ValueError, match="params"):
        JaxLayer(mlp_call, init_fn)


def test_call_fn_inputs_matched_positionally():
    def call_fn(params, x):
        return x @ params["w"]

    layer = JaxLayer(call_fn, params={"w": np.eye(2, dtype="float32")})
    x = np.arange(4, dtype="float32").reshape(2, 2)
    np.testing.assert_allclose(to_numpy(layer(x)), x)


def test_call_fn_must_take_inputs_even_if_names_valid():
    def call_fn(params):
        return params

    with pytest.raises(ValueError, match="inputs"):
        JaxLayer(call_fn, params={"w": np.zeros(2)})


def test_required_unknown_argument_rejected_at_the_call_unless_a_dict_fills_it():
    def call_fn(inputs, mode):
        return inputs * mode

    x = np.ones((2, 2), "float32")
    with pytest.raises(ValueError, match=r"`call_fn`.*`mode`"):
        JaxLayer(call_fn)(x)
    np.testing.assert_allclose(to_numpy(JaxLayer(call_fn)({"inputs": x, "mode": 3 * x})), 3 * x)


@pytest.mark.parametrize("missing", ["params", "state"])
def test_params_or_state_without_init_fn_or_values(missing):
    def call_params(params, inputs):
        return inputs

    def call_state(state, inputs):
        return inputs, state

    fn = call_params if missing == "params" else call_state
    with pytest.raises(ValueError) as info:
        JaxLayer(fn, name="lonely")
    message = str(info.value)
    assert f"`{missing}`" in message
    assert "init_fn" in message
    assert "lonely" in message


# ---------------------------------------------------------- no copy of the initial values


def test_layer_keeps_no_reference_to_given_params():
    given = {"w": np.ones((3, 2), "float32")}

    def call_fn(params, inputs):
        return inputs @ params["w"]

    layer = JaxLayer(call_fn, params=given)
    layer(np.ones((2, 3), "float32"))
    gc.collect()
    holders = [r for r in gc.get_referrers(given) if not inspect.isframe(r)]
    assert holders == [], "the layer still references the initial params after build"
