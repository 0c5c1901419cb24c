"""The PyTorch bridge: views of the layer's variables, gradients, and calls that need none.

Per call on CPU, the bridge hands JAX cached views of the layer's variables that share their
memory (still valid after an optimizer's in-place update), differentiates only what torch asks
a gradient for, and runs an inference call that needs a gradient (an eager `layer(x)` outside
`torch.no_grad()`: Keras's params require grad) without the vjp's residuals, recomputing the
forward pass in its backward should one come. These tests hold the results to Flax's and
`jax.grad`'s, and hold the views to what torch wrote.
"""

import os

import pytest

if os.environ.get("KERAS_BACKEND") != "torch":
    pytest.skip(
        "tests of the PyTorch bridge (DLPack, autograd); run with KERAS_BACKEND=torch",
        allow_module_level=True,
    )

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import torch

from flaxlayer import FlaxLayer, _compat
from flaxlayer._bridges.torch import _Views
from helpers import flax_inference
from sample_data import normal_data

ATOL = 1e-5


class Net(nn.Module):
    """Dense + BatchNorm (state written in training) + Dense, and a sown loss."""

    @nn.compact
    def __call__(self, inputs, training=False):
        x = nn.Dense(6)(inputs)
        x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
        out = nn.Dense(3)(nn.tanh(x))
        self.sow("losses", "l2", 0.1 * jnp.sum(jnp.square(out)))
        return out


class TwoOutputs(nn.Module):
    """A float output, a second one the loss leaves unused, and an integer one."""

    @nn.compact
    def __call__(self, inputs, training=False):
        h = nn.Dense(4)(inputs)
        return {"used": jnp.sin(h), "unused": h * 2.0, "label": jnp.argmax(h, axis=-1)}


class Counter(nn.Module):
    """Scales its inputs by a state variable it increments on every call, training or not."""

    @nn.compact
    def __call__(self, inputs, training=False):
        scale = self.variable("counter", "scale", lambda: jnp.ones((), jnp.float32))
        out = nn.Dense(2)(inputs * scale.value)
        scale.value = scale.value + 1.0
        return out


def _layer(module, x: np.ndarray) -> FlaxLayer:
    layer = FlaxLayer(module)
    with torch.no_grad():
        layer(torch.from_numpy(x))  # builds it
    return layer


def _at(tree, path: str):
    """The leaf of a Flax variable tree at a layer weight's path ("flax_layer/params/...")."""
    for key in path.split("/")[1:]:
        tree = tree[key]
    return tree


def _jax_grads(layer, x, training, objective):
    """jax.grad of `objective(outputs) + sown losses` with respect to (variables, inputs), the
    module applied by Flax itself to the values the layer holds now."""
    module, variables = layer.module, layer.flax_variables

    def total(variables, x):
        out, mutated = module.apply(variables, x, training=training, mutable=True)
        losses = jax.tree.leaves(mutated.get("losses", {}))
        return objective(out) + sum(jnp.sum(v) for v in losses)

    return jax.grad(total, argnums=(0, 1))(variables, jnp.asarray(x))


def _backward(layer, x_t, training, objective):
    out = layer(x_t, training=training)
    total = objective(out) + sum(layer.losses, torch.zeros(()))
    total.backward()


def _assert_param_grads(layer, expected, frozen=()):
    for w in layer.trainable_weights + [v for v in layer.weights if v.path in frozen]:
        grad = w.value.grad
        if w.path in frozen:
            assert grad is None, w.path
            continue
        assert grad is not None, w.path
        np.testing.assert_allclose(grad.numpy(), _at(expected, w.path), atol=ATOL, err_msg=w.path)


def _square_sum(out):
    return (out**2).sum()


# ------------------------------------------------------------------------- calls, no gradient


def test_eager_call_equals_flax_with_and_without_grad():
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    expected = flax_inference(layer, x)
    out = layer(torch.from_numpy(x))
    assert out.requires_grad and out.grad_fn is not None  # Keras's params require grad
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=ATOL)
    with torch.no_grad():
        quiet = layer(torch.from_numpy(x))
    assert not quiet.requires_grad
    np.testing.assert_allclose(quiet.numpy(), expected, atol=ATOL)


def test_torch_module_methods_that_move_a_model_keep_working():
    """`model.to(...)`, `.float()` and `.cpu()` run torch.nn.Module's own `_apply`, which a
    flaxlayer layer must not shadow."""
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    expected = flax_inference(layer, x)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.to("cpu").float()
    layer.cpu()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), expected, atol=ATOL)


def test_calls_after_in_place_updates_see_the_new_values():
    """Adam's in-place updates (fit), `assign` and a write through `.value` all reach the next
    eager call, whether or not the variable's memory is shared with its cached JAX view."""
    x = normal_data(16, 5)
    layer = _layer(Net(), x)
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    for _ in range(2):
        model.fit(x, np.ones((16, 3), "float32"), epochs=1, batch_size=8, verbose=0)
        np.testing.assert_allclose(model.predict(x, verbose=0), flax_inference(layer, x), atol=ATOL)
        kernel = next(w for w in layer.weights if w.path.endswith("Dense_1/kernel"))
        kernel.assign(kernel.numpy() * 0.5)
        mean = next(w for w in layer.weights if w.path.endswith("mean"))
        with torch.no_grad():
            mean.value.add_(1.0)
        with torch.no_grad():
            out = layer(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, flax_inference(layer, x), atol=ATOL)


def test_views_follow_in_place_writes():
    """A view sharing its tensor's memory is kept across in-place writes (no new import) and
    reads them. Memory JAX cannot share (misaligned) goes over as a copy while unwritten, else
    as its NumPy view: every call sees the tensor's current values."""
    views = _Views("views", host=True)
    shared = torch.arange(6.0)  # torch's allocator aligns: JAX imports it without a copy
    copied = torch.from_numpy(np.arange(7.0, dtype=np.float32)[1:])  # 4 bytes off alignment
    first = views([shared, copied])
    assert first[0].unsafe_buffer_pointer() == shared.data_ptr()
    assert first[1].unsafe_buffer_pointer() != copied.data_ptr()
    for _ in range(3):
        shared.mul_(3.0)
        copied.mul_(3.0)
        for _call in range(2):  # written, then unwritten since the last call
            now = views([shared, copied])
            assert now[0] is first[0]
            np.testing.assert_array_equal(np.asarray(now[0]), shared.numpy())
            np.testing.assert_array_equal(np.asarray(now[1]), copied.numpy())
    shared.resize_(3)  # the same memory in another layout: a new view
    (resized,) = views([shared])
    assert resized is not first[0] and resized.shape == (3,)


def test_host_arrays_convert_to_torch_sharing_their_buffer():
    convert = _compat.jax_host_array_to_torch()
    array = jax.jit(lambda a: jnp.tanh(a @ a))(jnp.eye(64) * 2.0)  # converted as it computes
    tensor = convert(array)
    assert tensor.data_ptr() == array.unsafe_buffer_pointer()
    np.testing.assert_allclose(tensor.numpy(), np.tanh(np.eye(64) * 4.0), atol=1e-6)
    assert convert(jnp.ones((2,), jnp.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("inputs_need_grad", [False, True], ids=["data", "inputs-grad"])
def test_training_gradients_equal_jax_grad(inputs_need_grad):
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    expected, expected_x = _jax_grads(layer, x, True, lambda out: jnp.sum(out**2))
    x_t = torch.from_numpy(x).requires_grad_(inputs_need_grad)
    _backward(layer, x_t, True, _square_sum)
    _assert_param_grads(layer, expected)
    if inputs_need_grad:
        np.testing.assert_allclose(x_t.grad.numpy(), expected_x, atol=ATOL)
    else:
        assert x_t.grad is None


def test_inference_gradients_equal_jax_grad_on_every_call():
    """An inference call's backward recomputes the forward pass; once one has run, the next
    calls keep the vjp's residuals instead: both give jax.grad's gradients."""
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    expected, expected_x = _jax_grads(layer, x, False, lambda out: jnp.sum(out**2))
    for _ in range(3):
        for w in layer.trainable_weights:
            w.value.grad = None
        x_t = torch.from_numpy(x).requires_grad_(True)
        _backward(layer, x_t, False, _square_sum)
        _assert_param_grads(layer, expected)
        np.testing.assert_allclose(x_t.grad.numpy(), expected_x, atol=ATOL)


@pytest.mark.parametrize("training", [True, False])
def test_frozen_params_get_no_gradient(training):
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    layer.freeze(r"params/Dense_0/.*")
    frozen = {w.path for w in layer.weights if "Dense_0" in w.path}
    expected, _ = _jax_grads(layer, x, training, lambda out: jnp.sum(out**2))
    _backward(layer, torch.from_numpy(x), training, _square_sum)
    _assert_param_grads(layer, expected, frozen=frozen)


@pytest.mark.parametrize("training", [True, False])
def test_unused_and_integer_outputs(training):
    """An output the loss does not use gets zeros as its cotangent; an integer one no gradient."""
    x = normal_data(4, 5)
    layer = _layer(TwoOutputs(), x)
    expected, expected_x = _jax_grads(layer, x, training, lambda out: jnp.sum(out["used"]))
    x_t = torch.from_numpy(x).requires_grad_(True)
    out = layer(x_t, training=training)
    assert not out["label"].requires_grad and out["unused"].requires_grad
    out["used"].sum().backward()
    _assert_param_grads(layer, expected)
    np.testing.assert_allclose(x_t.grad.numpy(), expected_x, atol=ATOL)


def test_inference_backward_reads_the_state_the_call_read():
    """The call writes its state back at once; the recomputing backward still differentiates at
    the state the forward pass read."""
    x = normal_data(4, 5)
    layer = _layer(Counter(), x)
    expected, expected_x = _jax_grads(layer, x, False, lambda out: jnp.sum(out**2))
    scale = next(w for w in layer.weights if w.path.endswith("scale"))
    before = float(scale.numpy())
    x_t = torch.from_numpy(x).requires_grad_(True)
    out = layer(x_t)
    assert float(scale.numpy()) == before + 1.0
    _square_sum(out).backward()
    _assert_param_grads(layer, expected)
    np.testing.assert_allclose(x_t.grad.numpy(), expected_x, atol=ATOL)


def test_inference_backward_after_an_in_place_param_write_fails_as_torch_does():
    x = normal_data(4, 5)
    layer = _layer(Net(), x)
    out = layer(torch.from_numpy(x))
    kernel = next(w for w in layer.weights if w.path.endswith("Dense_1/kernel"))
    with torch.no_grad():
        kernel.value.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_fit_trains_like_jax_grad_steps():
    """Three plain SGD steps of `fit` move the params as three jax.grad steps do."""
    x, y = normal_data(8, 5), normal_data(8, 4, seed=1)
    layer = _layer(TwoOutputs(), x)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, layer(inputs)["used"])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    module, variables = layer.module, layer.flax_variables

    def loss(variables):
        return jnp.mean((module.apply(variables, x)["used"] - y) ** 2)

    for _ in range(3):
        grads = jax.grad(loss)(variables)
        variables = jax.tree.map(lambda v, g: v - 0.1 * g, variables, grads)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    for w in layer.weights:
        np.testing.assert_allclose(w.numpy(), _at(variables, w.path), atol=ATOL, err_msg=w.path)
