"""A .keras file saved under one backend loads under every other with equal predictions and keeps
training; bridge errors name the backend and the fix."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from flax import nnx

from backend_models import ConvBN, NNXNet
from flaxlayer import FlaxLayer
from helpers import SUPPORT_DIR

BACKENDS = ("jax", "tensorflow", "torch")

LOAD = """
import sys
import numpy as np, keras
sys.path.insert(0, {support!r})
import backend_models
import flaxlayer  # registers FlaxLayer with Keras, as a user script would
for path, data, finetuned in {files!r}:
    data = np.load(data)
    model = keras.saving.load_model(path, compile={compile})
    if not {compile}:
        model.compile(keras.optimizers.SGD(0.05), "mse")
    pred = keras.ops.convert_to_numpy(model.predict(data["x"], verbose=0))
    np.testing.assert_allclose(pred, data["pred"], atol=1e-5)
    weights = model.trainable_weights if finetuned else model.weights
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
    model.fit(data["x"], data["y"], epochs=1, batch_size=4, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in model.weights]
    moved = {{id(w) for w, a, b in zip(model.weights, before, after) if not np.allclose(a, b)}}
    changed = [id(w) in moved for w in weights]
    # A bias feeding BatchNorm gets a zero gradient; every other weight and statistic moves.
    assert sum(changed) >= len(changed) - 1, changed
    # Fine-tuned: the frozen and the int8 kernels stay as they were.
    fixed = [w for w in model.weights if finetuned and not w.trainable and "/params/" in w.path]
    assert not [w.path for w in fixed if id(w) in moved], fixed
    print("LOADED OK", keras.backend.backend(), path)
"""
KINDS = ("linen", "nnx", "finetuned")


def _model(kind):
    if kind == "finetuned":  # LoRA on the Dense kernel, an int8 conv, a frozen conv bias
        model, x, y = _model("linen")
        layer = model.layers[0]
        layer.quantize("int8", paths=r"params/Conv_0/kernel")
        layer.enable_lora(2, paths=r"params/Dense_0/kernel")
        layer.freeze(r"params/Conv_0/bias")
        return model, x, y
    if kind == "linen":
        model = keras.Sequential([keras.Input((6, 6, 1)), FlaxLayer(ConvBN())])
        x = np.random.default_rng(0).random((8, 6, 6, 1), dtype="float32")
    else:
        model = keras.Sequential([keras.Input((5,)), FlaxLayer(NNXNet(5, 3, rngs=nnx.Rngs(0)))])
        x = np.random.default_rng(0).random((8, 5), dtype="float32")
    y = np.random.default_rng(1).random((8, 3), dtype="float32")
    return model, x, y


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """A trained Linen and NNX model saved under this backend, with their predictions."""
    tmp_path = tmp_path_factory.mktemp("cross_backend")
    files = []
    for kind in KINDS:
        model, x, y = _model(kind)
        model.compile(keras.optimizers.SGD(0.05), "mse")
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        path = str(tmp_path / f"{kind}.keras")
        model.save(path)
        data = str(tmp_path / f"{kind}.npz")
        pred = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        np.savez(data, x=x, y=y, pred=pred)
        files.append((path, data, kind == "finetuned"))
    return files


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_file_loads_under_every_other_backend(backend, saved_files):
    """Both files load in one fresh process per other backend, predict equally, keep training."""
    if backend == keras.backend.backend():
        pytest.skip("the files were saved under this backend")
    # Keras 3.15 saves a torch-trained model's optimizer as its torch-only class, which no other
    # backend can run (a plain keras.layers.Dense model fails the same way): recompile there.
    compile = keras.backend.backend() != "torch"
    env = dict(os.environ, KERAS_BACKEND=backend)
    code = LOAD.format(support=SUPPORT_DIR, files=saved_files, compile=compile)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, f"{backend}: {result.stderr[-3000:]}"
    for path, _, _ in saved_files:
        assert f"LOADED OK {backend} {path}" in result.stdout


def test_torch_tensor_on_a_device_jax_cannot_see_gives_clear_error():
    if keras.backend.backend() != "torch":
        pytest.skip("the DLPack hand-off exists on the PyTorch backend only")
    import types

    import jax
    import torch

    from flaxlayer._bridges.torch import to_jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees a GPU here")
    # No CUDA device exists on this machine: a stand-in tensor that claims to live on one.
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError) as info:
        to_jax(on_gpu, "FlaxLayer 'flax_layer'")
    message = str(info.value)
    for part in ("FlaxLayer 'flax_layer'", "PyTorch backend", "cuda:0", "JAX cannot see", "CPU"):
        assert part in message
