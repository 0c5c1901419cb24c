"""NNX modules in `.keras` files: round trips, static attributes, and safe loading."""

import os
import sys
import zipfile

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import nnx_models as nm
from flaxlayer import FlaxLayer
from helpers import rewrite_config, save_load, to_numpy
from sample_data import normal_data


def _own(variables):
    # Keras does not save seed generator states (for its own layers neither).
    return [v for v in variables if "seed_generator" not in v.path]


def _assert_same_weights(a, b, *, paths=True):
    a, b = _own(a), _own(b)
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if paths:  # a loaded Sequential builds its layers outside its own name scope
            assert u.path.removeprefix("sequential/") == v.path.removeprefix("sequential/")
            assert u.trainable == v.trainable, u.path
        np.testing.assert_array_equal(to_numpy(u), to_numpy(v), err_msg=u.path)


def _fitted_model(module, *, functional=False, epochs=1):
    layer = FlaxLayer(module)
    if functional:
        inputs = keras.Input((3,))
        model = keras.Model(inputs, layer(inputs))
    else:
        model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        normal_data(),
        normal_data(dim=2, seed=1),
        epochs=epochs,
        batch_size=8,
        shuffle=False,
        verbose=0,
    )
    return model


# ------------------------------------------------------------------------ natural flow


@pytest.mark.parametrize(
    ("make", "functional"),
    [
        (lambda: nm.MLP(3, 2, rngs=nnx.Rngs(0)), False),
        (lambda: nm.MLP(3, 2, rngs=nnx.Rngs(0)), True),
        (lambda: nm.ListNet(3, 2, rngs=nnx.Rngs(0)), False),
    ],
    ids=["mlp-sequential", "mlp-functional", "nnx-list"],
)
def test_round_trip_without_user_code(make, functional, tmp_path):
    model = _fitted_model(make(), functional=functional)
    loaded = save_load(model, tmp_path)
    x = normal_data()
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    _assert_same_weights(model.weights, loaded.weights)
    layer = next(la for la in loaded.layers if isinstance(la, FlaxLayer))
    assert type(layer.module) is type(make())
    # Training goes on.
    before = [to_numpy(v).copy() for v in loaded.trainable_weights]
    history = loaded.fit(x, normal_data(dim=2, seed=1), epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(
        not np.allclose(b, to_numpy(v))
        for b, v in zip(before, loaded.trainable_weights, strict=True)
    )


def test_fit_continues_exactly_where_it_stopped(tmp_path):
    """No dropout (Keras saves no seed generator state): the continuation is exact."""
    model = _fitted_model(nm.BNNet(3, 2, rngs=nnx.Rngs(0)))
    loaded = save_load(model, tmp_path)
    x, y = normal_data(), normal_data(dim=2, seed=1)
    _assert_same_weights(model.optimizer.variables, loaded.optimizer.variables, paths=False)
    model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    loaded.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7, err_msg=a.path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_method_forms_round_trip(tmp_path):
    x = normal_data()
    for method in ("encode", nm.double_encode):
        module = nm.MLP(3, 2, rngs=nnx.Rngs(0))
        model = keras.Sequential([keras.Input((3,)), FlaxLayer(module, method=method)])
        loaded = save_load(model, tmp_path)
        np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
        assert loaded.layers[0].output.shape == (None, 8)


# ------------------------------------------------------------------- static attributes


def test_static_attributes_round_trip(tmp_path):
    module = nm.Configured(3, 2, rngs=nnx.Rngs(0), sizes=(6, 5), tag="cfg", dtype=jnp.float32)
    model = _fitted_model(module)
    loaded = save_load(model, tmp_path)
    x = normal_data()
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    _assert_same_weights(model.weights, loaded.weights)
    m = loaded.layers[0].module
    assert type(m) is nm.Configured
    assert m.din == 3 and type(m.din) is int
    assert m.sizes == (6, 5) and type(m.sizes) is tuple
    assert m.tag == "cfg"
    assert m.activation is jax.nn.gelu
    assert jnp.dtype(m.compute_dtype) == jnp.float32
    assert jnp.dtype(m.hidden.dtype) == jnp.float32
    key = jax.random.key(3)
    np.testing.assert_array_equal(np.asarray(m.init_fn(key, (4,))), module.init_fn(key, (4,)))
    np.testing.assert_array_equal(
        np.asarray(m.other_init(key, (4, 3))), module.other_init(key, (4, 3))
    )


def test_shared_submodules_stay_shared(tmp_path):
    module = nm.SharedNet(3, rngs=nnx.Rngs(0))
    model = _fitted_model(module)
    loaded = save_load(model, tmp_path)
    m = loaded.layers[0].module
    assert m.first is m.second
    assert loaded.count_params() == model.count_params() == 12 + 8
    x = normal_data()
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_user_variable_types_round_trip(tmp_path):
    model = _fitted_model(nm.VariableKinds(3, 2, rngs=nnx.Rngs(0)))
    loaded = save_load(model, tmp_path)
    _assert_same_weights(model.weights, loaded.weights)
    m = loaded.layers[0].module
    assert type(m.calls) is nm.Count
    assert m.calls.get_metadata().get("note") == "number of calls"
    assert int(m.calls.get_value()) == 2
    assert type(m.scale) is nm.Scale
    assert type(m.last_mean) is nnx.Cache
    assert "sequential/flax_layer/scale" in {v.path for v in model.trainable_weights}
    assert any(v.path.endswith("/scale") for v in loaded.layers[0].trainable_weights)
    state = loaded.layers[0].flax_variables
    assert isinstance(state["calls"], nm.Count)
    loaded.fit(normal_data(), normal_data(dim=2, seed=1), epochs=1, batch_size=8, verbose=0)
    assert int(to_numpy(next(v for v in loaded.weights if v.path.endswith("calls")))) == 4


@pytest.mark.parametrize(("cls", "attribute"), [(nm.WithLambda, "post"), (nm.WithObject, "helper")])
def test_unsupported_static_attribute_fails_at_save(cls, attribute, tmp_path):
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(cls(3, rngs=nnx.Rngs(0)))])
    model.compile(optimizer="adam", loss="mse")
    model.fit(
        normal_data(), normal_data(dim=2, seed=1), epochs=1, batch_size=8, verbose=0
    )  # works until saved
    with pytest.raises(ValueError, match=attribute) as info:
        model.save(tmp_path / "bad.keras")
    assert cls.__name__ in str(info.value)


# ------------------------------------------------------------------------ safe loading


def _replace_refs(config, old, new):
    """Replaces, in place, every {"module": ..., "qualname": ...} reference equal to `old`."""
    config.update(_replaced_refs(config, old, new))


def _replaced_refs(obj, old, new):
    """A copy of `obj` with every {"module": ..., "qualname": ...} reference equal to `old`
    replaced by `new`."""
    if isinstance(obj, dict):
        if obj.get("module") == old[0] and obj.get("qualname") == old[1]:
            return {**obj, "module": new[0], "qualname": new[1]}
        return {k: _replaced_refs(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replaced_refs(v, old, new) for v in obj]
    return obj


def _saved(tmp_path, method=None):
    module = (
        nm.VariableKinds(3, 2, rngs=nnx.Rngs(0))
        if method is None
        else nm.MLP(3, 2, rngs=nnx.Rngs(0))
    )
    model = keras.Sequential([keras.Input((3,)), FlaxLayer(module, method=method)])
    path = tmp_path / "good.keras"
    model.save(path)
    return path


@pytest.fixture
def system_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append((a, k)) or 0)
    return calls


@pytest.mark.parametrize(
    "old",
    [("nnx_models", "VariableKinds"), ("nnx_models", "Count"), ("flax.nnx.nn.linear", "Linear")],
    ids=["module-class", "variable-class", "submodule-class"],
)
def test_class_pointing_at_os_system_is_refused(old, tmp_path, system_calls):
    path = _saved(tmp_path)
    bad = tmp_path / "bad.keras"
    rewrite_config(path, bad, lambda c: _replace_refs(c, old, ("os", "system")))
    with zipfile.ZipFile(bad) as z:
        assert '"module": "os", "qualname": "system"' in z.read("config.json").decode()
    with pytest.raises(ValueError, match=r"os\.system") as info:
        keras.saving.load_model(bad)
    assert "not a Flax module class" in str(info.value)
    assert system_calls == []


def test_method_function_pointing_at_os_system_is_refused(tmp_path, system_calls):
    path = _saved(tmp_path, method=nm.double_encode)
    bad = tmp_path / "bad.keras"
    rewrite_config(
        path, bad, lambda c: _replace_refs(c, ("nnx_models", "double_encode"), ("os", "system"))
    )
    with pytest.raises(ValueError, match=r"os\.system") as info:
        keras.saving.load_model(bad)
    assert "Safe loading" in str(info.value)
    assert system_calls == []


def test_class_in_a_module_not_imported_is_not_imported(tmp_path, monkeypatch):
    canary_dir = tmp_path / "pkg"
    canary_dir.mkdir()
    marker = tmp_path / "imported.txt"
    (canary_dir / "nnx_canary_never_imported.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from flax import nnx\n"
        "class VariableKinds(nnx.Module):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(canary_dir))
    path = _saved(tmp_path)
    bad = tmp_path / "bad.keras"
    rewrite_config(
        path,
        bad,
        lambda c: _replace_refs(
            c, ("nnx_models", "VariableKinds"), ("nnx_canary_never_imported", "VariableKinds")
        ),
    )
    with pytest.raises(ValueError, match="nnx_canary_never_imported") as info:
        keras.saving.load_model(bad)
    assert "import" in str(info.value)
    assert "nnx_canary_never_imported" not in sys.modules
    assert not marker.exists()


def test_attention_module_round_trip(tmp_path):
    # MultiHeadAttention's LinearGeneral layers keep FrozenDict attributes (batch_axis).
    model = keras.Sequential([keras.Input((5, 4)), FlaxLayer(nm.AttentionNet(rngs=nnx.Rngs(0)))])
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    loaded = save_load(model, tmp_path)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), atol=1e-6)
    layer = next(la for la in loaded.layers if isinstance(la, FlaxLayer))
    assert isinstance(layer.module.attention, nnx.MultiHeadAttention)
