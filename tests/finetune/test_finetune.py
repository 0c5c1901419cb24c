"""Fine-tuning by Flax path: freeze, LoRA and int8 on Linen, NNX and JaxLayer models, with no
change to the model's code, on every backend."""

import os

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from finetune_models import KINDS, LinenNet, NNXNet, net_call
from flaxlayer import FlaxLayer, JaxLayer, SerializationError
from helpers import flax_inference, rewrite_config, to_numpy

X = np.random.default_rng(0).normal(size=(16, 6, 6, 1)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")


def built(kind):
    make, prefix = KINDS[kind]
    layer = make()
    model = keras.Sequential([keras.Input((6, 6, 1)), layer])
    return model, layer, prefix


def rel(path: str) -> str:
    """A variable's path under the layer (Keras prefixes the model's name when it builds it)."""
    return path.split("net/", 1)[1]


def snapshot(variables) -> dict:
    return {rel(v.path): to_numpy(v).copy() for v in variables}


def fit(model, steps=2):
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(X, Y, batch_size=8, epochs=steps // 2, verbose=0)


def predict(model):
    return to_numpy(model.predict(X, verbose=0))


def describe_rows(layer) -> dict:
    lines: list[str] = []
    layer.describe(print_fn=lines.append)
    return {line.split()[0]: "yes" if " yes " in line else "no" for line in lines[3:-2]}


# --------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_keeps_values_bitwise_and_counts_follow(kind):
    model, layer, p = built(kind)
    total = model.count_params()
    layer.freeze(p + r"backbone/.*")
    frozen = {rel(v.path) for v in layer.weights if "/backbone/" in v.path}
    assert len(frozen) == 2
    assert not frozen & {rel(v.path) for v in layer.trainable_weights}
    rows = describe_rows(layer)
    assert {path for path, trainable in rows.items() if "backbone" in path} == {
        p + "backbone/kernel",
        p + "backbone/bias",
    }
    assert all(rows[p + f"backbone/{n}"] == "no" for n in ("kernel", "bias"))
    assert model.count_params() == total
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == total - sum(
        int(np.prod(v.shape)) for v in model.non_trainable_weights
    )
    before = snapshot(layer.weights)
    fit(model)
    after = snapshot(layer.weights)
    for path in frozen:
        assert np.array_equal(before[path], after[path]), path
    assert not np.array_equal(before[p + "head/kernel"], after[p + "head/kernel"])
    layer.unfreeze([p + "backbone/kernel", p + "backbone/bias"])
    assert frozen <= {rel(v.path) for v in layer.trainable_weights}


def test_a_pattern_that_matches_nothing_lists_paths():
    _, layer, _ = built("linen")
    with pytest.raises(ValueError) as info:
        layer.freeze([r"params/head/.*", r"encoder/.*"])
    message = str(info.value)
    for part in ("FlaxLayer 'net'", "freeze", "'encoder/.*'", "matches no", "params/head/kernel"):
        assert part in message
    assert all(v.trainable for v in layer.weights if "/params/" in v.path and "/bn/" not in v.path)


def test_freezing_before_build_says_to_build_first():
    with pytest.raises(ValueError, match=r"needs a built layer.*layer.build"):
        FlaxLayer(LinenNet()).freeze(".*")
    with pytest.raises(TypeError, match="freeze needs `paths`"):
        FlaxLayer(LinenNet()).freeze(None)


# ------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_only_adapters_and_merges_for_deployment(kind):
    model, layer, p = built(kind)
    y0 = predict(model)
    layer.enable_lora(2)
    kernels = [p + "backbone/kernel", p + "head/kernel"] + (
        [p + "conv/kernel"] if kind != "jax" else []
    )
    lora = {rel(v.path): tuple(v.shape) for v in layer.weights if "/lora/" in v.path}
    assert set(lora) == {f"lora/{k}/{ab}" for k in kernels for ab in "ab"}
    if kind != "jax":  # the conv's (3, 3, 1, 4) kernel, as (9, 4)
        assert lora[f"lora/{p}conv/kernel/a"] == (9, 2)
        assert lora[f"lora/{p}conv/kernel/b"] == (2, 4)
    assert np.array_equal(predict(model), y0)  # b starts at zero
    before = snapshot(layer.weights)
    fit(model)
    after = snapshot(layer.weights)
    for k in kernels:
        assert np.array_equal(before[k], after[k]), k
        assert not np.array_equal(before[f"lora/{k}/b"], after[f"lora/{k}/b"]), k
    # The optimizer keeps state for the trainable variables only: adapters, biases, BN scales.
    slots = [v.path for v in model.optimizer.variables if v.path.endswith("_momentum")]
    assert slots and not [s for s in slots if "kernel" in s and "lora" not in s]
    trained = predict(model)
    assert not np.allclose(trained, y0)
    if kind != "jax":  # flax_variables are merged: pure Flax reproduces the outputs
        np.testing.assert_allclose(flax_inference(layer, X), trained, atol=1e-5)
    if kind == "nnx":  # into a module of the user's: nnx.update
        module = NNXNet(nnx.Rngs(5))
        nnx.update(module, layer.flax_variables)
        module.eval()
        np.testing.assert_allclose(module(X), trained, atol=1e-5)
    layer.merge_lora()
    assert not [v for v in layer.weights if "/lora/" in v.path]
    assert set(kernels) <= {rel(v.path) for v in layer.trainable_weights}
    np.testing.assert_allclose(to_numpy(layer(X)), trained, atol=1e-5)
    if kind == "jax":
        params = jax.tree.map(lambda v: jnp.asarray(to_numpy(v)), layer.params)
        np.testing.assert_allclose(net_call(params, X), trained, atol=1e-5)


def test_lora_update_is_a_at_b_times_alpha_over_rank():
    import flax.linen as nn

    layer = FlaxLayer(nn.Dense(3), name="dense")
    x = np.random.default_rng(2).normal(size=(4, 5)).astype("float32")
    layer(x)
    layer.enable_lora(2, alpha=6.0)
    a = np.random.default_rng(3).normal(size=(5, 2)).astype("float32")
    b = np.random.default_rng(4).normal(size=(2, 3)).astype("float32")
    by_path = {v.path: v for v in layer.weights}
    by_path["dense/lora/params/kernel/a"].assign(a)
    by_path["dense/lora/params/kernel/b"].assign(b)
    kernel = to_numpy(by_path["dense/params/kernel"]) + a @ b * (6.0 / 2)
    expected = x @ kernel + to_numpy(by_path["dense/params/bias"])
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_lora_refusals_name_the_problem():
    import flax.linen as nn

    with pytest.raises(ValueError, match="needs a built layer"):
        FlaxLayer(nn.Dense(3)).enable_lora(2)
    _, layer, _ = built("linen")
    with pytest.raises(ValueError, match=r"'params/head/bias' has shape \(3,\).*rank >= 2"):
        layer.enable_lora(2, paths=r"params/head/.*")
    with pytest.raises(ValueError, match=r"rank 4 is larger than the smaller side.*head/kernel"):
        layer.enable_lora(4, paths=r"params/head/kernel")
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        layer.enable_lora(0)
    layer.enable_lora(2, paths=r"params/head/kernel")
    with pytest.raises(ValueError, match="already enabled on 'params/head/kernel'"):
        layer.enable_lora(2, paths=r"params/head/kernel")
    dense = FlaxLayer(nn.Dense(3))
    dense.build((None, 2))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        dense.merge_lora()


def test_lora_on_an_integer_leaf_is_refused():
    def init(rng, inputs):
        return {"kernel": jnp.ones((4, 3)), "table": jnp.ones((4, 3), jnp.int32)}

    def call(params, inputs):
        return inputs @ params["kernel"] + params["table"][0]

    layer = JaxLayer(call, init)
    layer.build((None, 4))
    with pytest.raises(ValueError, match=r"'params/table'.*int32.*only float kernels"):
        layer.enable_lora(1, paths=r"params/table")


# ------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("kind", KINDS)
def test_model_quantize_int8_stays_close_and_round_trips(kind, tmp_path):
    model, layer, _ = built(kind)
    fit(model)
    y = predict(model)
    model.quantize("int8")
    kernels = {v.path: v for v in layer.weights if v.path.endswith("kernel")}
    assert kernels and all(
        keras.backend.standardize_dtype(v.dtype) == "int8" for v in kernels.values()
    )
    scales = [v for v in layer.weights if "/int8/" in v.path]
    assert len(scales) == len(kernels)
    yq = predict(model)
    # Per-channel int8 kernels: within 2% of the outputs' range on this trained model.
    assert np.abs(yq - y).max() <= 0.02 * np.abs(y).max()
    path = str(tmp_path / "q.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert np.array_equal(predict(loaded), yq)
    loaded_kernels = [w for w in loaded.weights if w.path.endswith("kernel")]
    assert all(keras.backend.standardize_dtype(w.dtype) == "int8" for w in loaded_kernels)
    if kind != "jax":  # flax_variables hold the dequantized floats
        np.testing.assert_allclose(flax_inference(layer, X), yq, atol=1e-5)
    fit(model)  # the float params still train; the int8 kernels stay
    assert all(np.array_equal(to_numpy(kernels[k]), to_numpy(v)) for k, v in kernels.items())


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_transforms_follow_the_dtype_policy(policy):
    import flax.linen as nn

    layer = FlaxLayer(nn.Dense(4), dtype=policy)
    x = np.ones((2, 8), "float32")
    expected = keras.backend.standardize_dtype(layer(x).dtype)
    assert expected == "bfloat16"
    layer.quantize("int8")
    layer.enable_lora(2)
    assert keras.backend.standardize_dtype(layer(x).dtype) == expected
    assert np.asarray(layer.flax_variables["params"]["kernel"]).dtype == layer.variable_dtype


def test_int8_file_is_about_four_times_smaller(tmp_path):
    import flax.linen as nn

    def saved_size(quantize: bool) -> int:
        model = keras.Sequential([keras.Input((512,)), FlaxLayer(nn.Dense(512, use_bias=False))])
        if quantize:
            model.quantize("int8")
        path = tmp_path / f"{quantize}.weights.h5"
        model.save_weights(path)
        return os.path.getsize(path)

    ratio = saved_size(False) / saved_size(True)
    assert 3.5 < ratio <= 4.0, ratio


def test_other_quantization_modes_name_int8():
    _, layer, _ = built("linen")
    with pytest.raises(NotImplementedError, match=r"supports mode 'int8'.*'int4'"):
        layer.quantize("int4")
    layer.quantize("int8", paths=r"params/head/kernel")
    with pytest.raises(ValueError, match="'params/head/kernel' is already quantized"):
        layer.quantize("int8", paths=r"params/head/kernel")
    with pytest.raises(ValueError, match=r"cannot unfreeze 'params/head/kernel'.*int8"):
        layer.unfreeze(r"params/head/kernel")


# ---------------------------------------------------------------------------- all together


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_frozen_paths_round_trip_through_keras_and_weights_files(kind, tmp_path):
    model, layer, p = built(kind)
    layer.quantize("int8", paths=p + "backbone/kernel")
    layer.enable_lora(2, paths=[p + "backbone/kernel", p + "head/kernel"], alpha=4.0)
    layer.freeze(p + "head/bias")
    q_before = snapshot(layer.weights)[p + "backbone/kernel"]
    fit(model)
    q_after = snapshot(layer.weights)[p + "backbone/kernel"]
    assert np.array_equal(q_before, q_after)
    y = predict(model)
    trainable = sorted(rel(v.path) for v in layer.trainable_weights)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert np.array_equal(predict(loaded), y)
    assert sorted(rel(v.path) for v in loaded.layers[0].trainable_weights) == trainable
    # .weights.h5 into a model given the same fine-tuning steps.
    model.save_weights(str(tmp_path / "m.weights.h5"))
    keras.backend.clear_session(free_memory=False)
    fresh, fresh_layer, _ = built(kind)
    fresh_layer.quantize("int8", paths=p + "backbone/kernel")
    fresh_layer.enable_lora(2, paths=[p + "backbone/kernel", p + "head/kernel"], alpha=4.0)
    fresh.load_weights(str(tmp_path / "m.weights.h5"))
    assert np.array_equal(predict(fresh), y)


def test_tampered_finetune_entries_are_refused(tmp_path):
    model, layer, _ = built("linen")
    layer.enable_lora(2, paths=r"params/head/kernel")
    path = tmp_path / "m.keras"
    model.save(path)
    tampered = {
        "huge rank": ("rank", 2**40, "LoRA rank"),
        "unknown path": ("path", "params/../../etc", "is not a param"),
        "unknown kind": ("kind", "exec", "is not a transform entry"),
        "bool rank": ("rank", True, "not a positive int"),
        "nan alpha": ("alpha", float("nan"), "not finite"),
    }
    for what, (key, value, expected) in tampered.items():

        def edit(config, key=key, value=value):
            entry = config["config"]["layers"][1]["config"]["finetune"]["transforms"][0]
            entry[key] = value

        bad = tmp_path / f"{what}.keras"
        rewrite_config(path, bad, edit)
        with pytest.raises(SerializationError, match=expected):
            keras.saving.load_model(bad)
