"""Variables: initialization at build, given variables, trainable/non-trainable, paths, and no
copy of the initial values kept."""

import gc
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from core_models import MLP, BatchNormModule, MyFlaxModule
from flaxlayer import FlaxLayer
from helpers import to_numpy
from sample_data import make_data

X = make_data(n=8)[0]


# ------------------------------------------------------- initialization and given variables


def test_init_at_build_from_input_shape():
    layer = FlaxLayer(nn.Dense(5))
    assert not layer.built
    layer.build((None, 3))
    assert layer.built
    assert tuple(layer.params["params"]["kernel"].shape) == (3, 5)
    assert tuple(layer.params["params"]["bias"].shape) == (5,)


def test_unknown_dimensions_become_one_at_init():
    class ShapeParam(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            # A parameter shaped like the input: reveals the shape init saw.
            p = self.param("p", nn.initializers.zeros, inputs.shape)
            return jnp.sum(p) + nn.Dense(2)(inputs)

    layer = FlaxLayer(ShapeParam())
    layer.build((None, None, 3))
    assert tuple(layer.params["params"]["p"].shape) == (1, 1, 3)


def test_given_variables_used_as_given():
    module = nn.Dense(4)
    given = module.init(jax.random.key(42), jnp.ones((1, 3)))
    layer = FlaxLayer(module, variables=given)
    out = to_numpy(layer(X))
    np.testing.assert_allclose(out, np.asarray(module.apply(given, X)), rtol=1e-6)
    np.testing.assert_array_equal(
        to_numpy(layer.params["params"]["kernel"]), np.asarray(given["params"]["kernel"])
    )


def test_the_params_tree_alone_is_taken_as_the_params_collection():
    # As Hugging Face's `model.params` holds it: no top-level "params" key.
    module = MLP()
    given = _mlp_vars()
    bare = {"Dense_0": given["params"]["Dense_0"], "Dense_1": given["params"]["Dense_1"]}
    without_stats = nn.Dense(4)
    dense_given = without_stats.init(jax.random.key(3), jnp.ones((1, 3)))
    layer = FlaxLayer(without_stats, variables=dense_given["params"])
    np.testing.assert_allclose(
        to_numpy(layer(X)), np.asarray(without_stats.apply(dense_given, X)), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="batch_stats/BatchNorm_0/mean"):
        FlaxLayer(module, variables=bare)(X)  # state the module needs is still checked


def test_given_variables_with_state_used_as_given():
    module = BatchNormModule()
    given = module.init(jax.random.key(1), jnp.ones((1, 3)), training=False)
    given = jax.tree.map(lambda a: a, given)
    given["batch_stats"]["BatchNorm_0"]["mean"] = jnp.full((4,), 0.25)
    given["batch_stats"]["BatchNorm_0"]["var"] = jnp.full((4,), 4.0)
    layer = FlaxLayer(module, variables=given)
    out = to_numpy(layer(X))
    expected = module.apply(given, X, training=False)
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"]), 0.25)
    np.testing.assert_allclose(to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["var"]), 4.0)


def _mlp_vars():
    return MLP().init(jax.random.key(0), jnp.ones((1, 3)), training=False)


def test_given_variables_wrong_shape_names_path_and_shapes():
    module = MLP()
    given = _mlp_vars()
    given["params"]["Dense_0"]["kernel"] = jnp.zeros((5, 8))
    layer = FlaxLayer(module, variables=given, name="bad_shapes")
    with pytest.raises(ValueError) as info:
        layer(X)
    message = str(info.value)
    assert "params/Dense_0/kernel" in message
    assert "(3, 8)" in message
    assert "(5, 8)" in message
    assert "bad_shapes" in message


def test_given_variables_missing_key_named():
    given = _mlp_vars()
    del given["params"]["Dense_1"]["bias"]
    with pytest.raises(ValueError, match="params/Dense_1/bias"):
        FlaxLayer(MLP(), variables=given)(X)


def test_given_variables_missing_collection_named():
    given = _mlp_vars()
    del given["batch_stats"]
    with pytest.raises(ValueError, match="batch_stats/BatchNorm_0/mean"):
        FlaxLayer(MLP(), variables=given)(X)


def test_given_variables_extra_collection_named():
    given = dict(nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3))))
    given["batch_stats"] = {"extra": jnp.zeros((4,))}
    with pytest.raises(ValueError, match="batch_stats/extra"):
        FlaxLayer(nn.Dense(4), variables=given)(X)


def test_given_variables_extra_key_named():
    given = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    given["params"]["surplus"] = jnp.zeros((2,))
    with pytest.raises(ValueError, match="params/surplus"):
        FlaxLayer(nn.Dense(4), variables=given)(X)


def test_given_variables_mismatch_in_functional_model():
    given = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 7)))
    with pytest.raises(ValueError, match="params/kernel"):
        FlaxLayer(nn.Dense(4), variables=given)(keras.Input((3,)))


# -------------------------------------------------------- params / state / flax_variables


def test_params_and_state_trees_mirror_flax():
    module = MLP()
    layer = FlaxLayer(module)
    layer(X)
    reference = module.init(jax.random.key(0), jnp.ones((1, 3)), training=False)
    shapes = jax.tree.map(lambda v: tuple(v.shape), {**layer.params, **layer.state})
    assert shapes == jax.tree.map(lambda a: tuple(a.shape), dict(reference))
    assert isinstance(layer.params["params"]["Dense_0"]["kernel"], keras.Variable)
    assert isinstance(layer.state["batch_stats"]["BatchNorm_0"]["mean"], keras.Variable)
    assert set(layer.state) == {"batch_stats"}


def test_params_before_build_is_a_clear_error():
    layer = FlaxLayer(nn.Dense(2), name="unbuilt")
    with pytest.raises(ValueError, match="unbuilt"):
        _ = layer.params


def test_flax_variables_round_trip_after_training():
    module = MLP()
    x, y = make_data(n=16)
    layer = FlaxLayer(module)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)

    flax_vars = layer.flax_variables
    assert set(flax_vars) == {"params", "batch_stats"}
    expected = module.apply(flax_vars, x, training=False)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np.asarray(expected), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(to_numpy(layer(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_flax_variables_keep_partitioning_boxes():
    module = nn.Dense(
        4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
    )
    layer = FlaxLayer(module)
    out = to_numpy(layer(X))
    flax_vars = layer.flax_variables
    assert isinstance(flax_vars["params"]["kernel"], nn.Partitioned)
    assert flax_vars["params"]["kernel"].names == (None, "model")
    np.testing.assert_allclose(np.asarray(module.apply(flax_vars, X)), out, rtol=1e-5, atol=1e-6)
    # The Keras variable itself holds the plain array.
    assert tuple(layer.params["params"]["kernel"].shape) == (3, 4)


# -------------------------------------------------------------- trainable / non-trainable


def test_params_trainable_other_collections_not():
    layer = FlaxLayer(MLP())
    layer(X)
    trainable = {v.path for v in layer.trainable_weights}
    non_trainable = {v.path for v in layer.non_trainable_weights}
    assert trainable == {
        v.path for v in jax.tree.leaves(layer.params, is_leaf=lambda v: hasattr(v, "path"))
    }
    assert all("/params/" in p for p in trainable)
    assert non_trainable == {
        "flax_layer/batch_stats/BatchNorm_0/mean",
        "flax_layer/batch_stats/BatchNorm_0/var",
    }


def test_batch_stats_updated_by_fit_not_by_predict_or_evaluate():
    x, _ = make_data(n=16)
    x = x * 3.0 + 2.0  # far from the initial mean 0 / var 1
    layer = FlaxLayer(BatchNormModule())
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    mean = layer.state["batch_stats"]["BatchNorm_0"]["mean"]
    var = layer.state["batch_stats"]["BatchNorm_0"]["var"]
    np.testing.assert_allclose(to_numpy(mean), 0.0)

    y4 = np.zeros((16, 4), "float32")
    model.fit(x, y4, epochs=1, batch_size=8, verbose=0)
    after_fit = (to_numpy(mean).copy(), to_numpy(var).copy())
    assert not np.allclose(after_fit[0], 0.0)
    assert not np.allclose(after_fit[1], 1.0)

    model.predict(x, verbose=0)
    model.evaluate(x, y4, verbose=0)
    layer(x)
    np.testing.assert_array_equal(to_numpy(mean), after_fit[0])
    np.testing.assert_array_equal(to_numpy(var), after_fit[1])

    # A direct training call writes back too.
    layer(x, training=True)
    assert not np.allclose(to_numpy(mean), after_fit[0])


def test_batch_stats_written_back_matches_flax():
    module = BatchNormModule()
    layer = FlaxLayer(module)
    layer(X)
    before = layer.flax_variables
    layer(X, training=True)
    _, mutated = module.apply(before, X, training=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        to_numpy(layer.state["batch_stats"]["BatchNorm_0"]["mean"]),
        np.asarray(mutated["batch_stats"]["BatchNorm_0"]["mean"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_trainable_false_freezes_params():
    x, y = make_data(n=16)
    layer = FlaxLayer(nn.Dense(2), trainable=False)
    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.build((None, 3))
    kernel = to_numpy(layer.params["params"]["kernel"]).copy()
    assert layer.trainable_weights == []
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    np.testing.assert_array_equal(to_numpy(layer.params["params"]["kernel"]), kernel)


# --------------------------------------------------------------------------------- paths


def test_paths_standalone_default_name():
    layer = FlaxLayer(MyFlaxModule())
    layer.build((None, 8, 8, 1))
    assert layer.name == "flax_layer"
    assert layer.params["params"]["Conv_0"]["kernel"].path == "flax_layer/params/Conv_0/kernel"
    paths = [w.path for w in layer.weights]
    assert "flax_layer/params/Dense_1/bias" in paths
    assert len(paths) == len(set(paths)) == 6


def test_paths_for_state_and_custom_name():
    layer = FlaxLayer(MLP(), name="my_mlp")
    layer(X)
    assert (
        layer.state["batch_stats"]["BatchNorm_0"]["mean"].path
        == "my_mlp/batch_stats/BatchNorm_0/mean"
    )
    assert layer.params["params"]["Dense_0"]["kernel"].path == "my_mlp/params/Dense_0/kernel"
    paths = [w.path for w in layer.weights]
    assert len(paths) == len(set(paths))


def test_default_path_batch_stats_standalone():
    layer = FlaxLayer(MLP())
    layer(X)
    assert (
        layer.state["batch_stats"]["BatchNorm_0"]["mean"].path
        == "flax_layer/batch_stats/BatchNorm_0/mean"
    )


def test_paths_inside_sequential_and_two_layers_unique():
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(MLP(out=3)), FlaxLayer(MLP())])
    paths = [w.path for w in model.weights]
    assert len(paths) == len(set(paths))
    first, second = model.layers
    assert first.params["params"]["Dense_0"]["kernel"].path.endswith(
        f"{first.name}/params/Dense_0/kernel"
    )
    assert second.state["batch_stats"]["BatchNorm_0"]["var"].path.endswith(
        f"{second.name}/batch_stats/BatchNorm_0/var"
    )
    assert first.name != second.name


def test_same_leaf_name_in_params_and_state_stays_unique():
    class SameNames(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            w = self.param("w", nn.initializers.ones, (inputs.shape[-1],))
            s = self.variable("stats", "w", lambda: jnp.zeros((inputs.shape[-1],)))
            return inputs * w + s.value

    layer = FlaxLayer(SameNames())
    layer(X)
    assert {w.path for w in layer.weights} == {"flax_layer/params/w", "flax_layer/stats/w"}


# --------------------------------------------------------- no copy of the initial values


def test_layer_keeps_no_reference_to_given_variables():
    module = nn.Dense(4)
    given = module.init(jax.random.key(0), jnp.ones((1, 3)))
    layer = FlaxLayer(module, variables=given)
    layer(X)
    gc.collect()
    holders = [r for r in gc.get_referrers(given) if not inspect.isframe(r)]
    assert holders == [], "the layer still references the initial variables after build"


class _ForwardProbe(nn.Module):
    """Records every forward pass that is really computed (not just traced)."""

    @nn.compact
    def __call__(self, inputs):
        out = nn.Dense(3)(inputs)
        jax.debug.callback(lambda y: FORWARD_RUNS.append(y.shape), out)
        return out


class _DataDependentInit(nn.Module):
    """A param whose initial value depends on the input values (data-dependent init)."""

    @nn.compact
    def __call__(self, inputs):
        scale = self.param("scale", lambda rng: jnp.mean(inputs, axis=0) + 1.0)
        return inputs * scale


FORWARD_RUNS: list = []


def test_build_computes_the_variables_without_running_the_forward_pass():
    FORWARD_RUNS.clear()
    layer = FlaxLayer(_ForwardProbe(), seed=3)
    layer.build((None, 4))
    jax.effects_barrier()
    assert FORWARD_RUNS == []
    assert [v.path for v in layer.weights if "seed" not in v.path] == [
        "flax_layer/params/Dense_0/bias",
        "flax_layer/params/Dense_0/kernel",
    ]
    # The probe works: a plain module.init computes the forward pass on its inputs.
    _ForwardProbe().init(jax.random.key(0), jnp.zeros((1, 4)))
    jax.effects_barrier()
    assert FORWARD_RUNS == [(1, 3)]


def test_data_dependent_init_still_builds_on_zeros():
    layer = FlaxLayer(_DataDependentInit())
    layer.build((None, 3))
    scale = keras.ops.convert_to_numpy(layer.params["params"]["scale"])
    np.testing.assert_array_equal(scale, np.ones(3, "float32"))
