"""`layer.describe()`: the Flax variable tree inside a built layer, as a table."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

from flaxlayer import FlaxLayer, JaxLayer
from nnx_models import MLP as NNXMLP


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, inputs, training):
        x = nn.Dense(4)(inputs)
        x = nn.BatchNorm(use_running_average=not training)(x)
        return nn.Dense(2)(x)


class CounterNet(nn.Module):
    """Keeps an int32 call counter in its own collection."""

    @nn.compact
    def __call__(self, inputs):
        calls = self.variable("counter", "calls", lambda: jnp.zeros((), jnp.int32))
        calls.value += 1
        return nn.Dense(2)(inputs)


def _capture(layer):
    lines = []
    assert layer.describe(print_fn=lines.append) is None
    return lines


def _rows(lines):
    """{path: (shape, dtype, trainable, count)} from the lines between the two rules."""
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(rules) == 2, lines
    assert lines[rules[0] - 1].split() == ["path", "shape", "dtype", "trainable", "count"]
    rows = {}
    for line in lines[rules[0] + 1 : rules[1]]:
        path, shape, dtype, trainable, count = re.split(r"\s{2,}", line.strip())
        rows[path] = (shape, dtype, trainable, int(count.replace(",", "")))
    return rows


def _totals(line):
    numbers = [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) (?:params )?\(", line)]
    assert line.startswith("Total:") and len(numbers) == 3, line
    return dict(zip(("total", "trainable", "non_trainable"), numbers, strict=True))


def _size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def test_linen_batchnorm_params_and_batch_stats():
    layer = FlaxLayer(BNNet())
    model = keras.Sequential([keras.Input((3,)), layer])
    lines = _capture(layer)
    assert lines[0] == "FlaxLayer 'flax_layer' (Linen module BNNet)"
    rows = _rows(lines)
    assert rows == {
        "params/BatchNorm_0/bias": ("(4,)", "float32", "yes", 4),
        "params/BatchNorm_0/scale": ("(4,)", "float32", "yes", 4),
        "params/Dense_0/bias": ("(4,)", "float32", "yes", 4),
        "params/Dense_0/kernel": ("(3, 4)", "float32", "yes", 12),
        "params/Dense_1/bias": ("(2,)", "float32", "yes", 2),
        "params/Dense_1/kernel": ("(4, 2)", "float32", "yes", 8),
        "batch_stats/BatchNorm_0/mean": ("(4,)", "float32", "no", 4),
        "batch_stats/BatchNorm_0/var": ("(4,)", "float32", "no", 4),
    }
    # Rows follow the layer's variables; each Keras variable path ends with the Flax path.
    assert [w.path for w in layer.weights] == [f"sequential/flax_layer/{p}" for p in rows]
    totals = _totals(lines[-1])
    assert totals["total"] == model.count_params() == sum(r[3] for r in rows.values()) == 42
    assert totals["trainable"] == _size(model.trainable_weights) == 34
    assert totals["non_trainable"] == _size(model.non_trainable_weights) == 8
    assert lines[-1] == (
        "Total: 42 params (168.00 B); trainable: 34 (136.00 B); non-trainable: 8 (32.00 B)"
    )
    # Same table after training (values change, the tree does not).
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x[:, :2], epochs=1, batch_size=4, verbose=0)
    assert _capture(layer) == lines


def test_frozen_layer_has_no_trainable_rows():
    layer = FlaxLayer(BNNet())
    layer.build((None, 3))
    layer.trainable = False
    lines = _capture(layer)
    assert {r[2] for r in _rows(lines).values()} == {"no"}
    assert _totals(lines[-1]) == {"total": 42, "trainable": 0, "non_trainable": 42}


def test_integer_state_collection_is_described():
    layer = FlaxLayer(CounterNet())
    layer(np.ones((2, 3), "float32"))
    rows = _rows(_capture(layer))
    assert rows["counter/calls"] == ("()", "int32", "no", 1)
    assert rows["params/Dense_0/kernel"] == ("(3, 2)", "float32", "yes", 6)


def test_nnx_module_variables_are_described():
    layer = FlaxLayer(NNXMLP(3, 2, hidden=8, rngs=nnx.Rngs(0)))
    model = keras.Sequential([keras.Input((3,)), layer])
    lines = _capture(layer)
    assert lines[0] == "FlaxLayer 'flax_layer' (NNX module MLP)"
    rows = _rows(lines)
    assert rows["linear1/kernel"] == ("(3, 8)", "float32", "yes", 24)
    assert rows["linear2/bias"] == ("(2,)", "float32", "yes", 2)
    assert rows["bn/scale"][2] == "yes"
    assert rows["bn/mean"] == ("(8,)", "float32", "no", 8)
    assert rows["bn/var"][2] == "no"
    # No rng state rows: keys are drawn fresh per call, never stored.
    assert not any("rngs" in p for p in rows)
    totals = _totals(lines[-1])
    assert totals["total"] == model.count_params() == sum(r[3] for r in rows.values())
    assert totals["trainable"] == _size(model.trainable_weights)
    assert totals["non_trainable"] == _size(model.non_trainable_weights) == 16


def _init_fn(rng, inputs):
    params = {"dense": {"w": jax.random.normal(rng, (inputs.shape[-1], 2)), "b": jnp.zeros(2)}}
    return params, {"mean": jnp.zeros(inputs.shape[-1]), "steps": jnp.zeros((), jnp.int32)}


def _call_fn(params, state, inputs, training):
    new_state = dict(state, steps=state["steps"] + (1 if training else 0))
    out = (inputs - state["mean"]) @ params["dense"]["w"] + params["dense"]["b"]
    return out, new_state


def test_jax_layer_pytree_paths():
    layer = JaxLayer(_call_fn, _init_fn)
    layer(np.ones((2, 3), "float32"))
    lines = _capture(layer)
    assert lines[0].startswith("JaxLayer 'jax_layer' (call_fn _call_fn)")
    assert _rows(lines) == {
        "params/dense/b": ("(2,)", "float32", "yes", 2),
        "params/dense/w": ("(3, 2)", "float32", "yes", 6),
        "state/mean": ("(3,)", "float32", "no", 3),
        "state/steps": ("()", "int32", "no", 1),
    }
    assert lines[-1] == (
        "Total: 12 params (48.00 B); trainable: 8 (32.00 B); non-trainable: 4 (16.00 B)"
    )


def test_jax_layer_without_variables():
    layer = JaxLayer(lambda inputs: inputs * 2.0)
    layer(np.ones((2, 3), "float32"))
    lines = _capture(layer)
    assert lines[1] == "(no variables)"
    assert _totals(lines[-1]) == {"total": 0, "trainable": 0, "non_trainable": 0}


@pytest.mark.parametrize("make", [lambda: FlaxLayer(BNNet()), lambda: JaxLayer(_call_fn, _init_fn)])
def test_unbuilt_layer_error(make):
    layer = make()
    with pytest.raises(ValueError) as info:
        layer.describe()
    message = str(info.value)
    assert layer.name in message and type(layer).__name__ in message
    assert "not built" in message
    assert "layer.build(input_shape)" in message and "layer(x)" in message


def test_prints_with_print_by_default(capsys):
    layer = FlaxLayer(BNNet())
    layer.build((None, 3))
    lines = _capture(layer)
    assert layer.describe() is None
    assert capsys.readouterr().out == "\n".join(lines) + "\n"
    # Every line is a separate print_fn call, as with model.summary(print_fn=...).
    assert all("\n" not in line for line in lines)
    assert len(lines) == 1 + 2 + 8 + 1 + 1


def test_bytes_follow_the_variable_dtype():
    layer = FlaxLayer(nn.Dense(3, param_dtype=jnp.float16))
    layer.build((None, 4))
    lines = _capture(layer)
    assert _rows(lines)["params/kernel"] == ("(4, 3)", "float16", "yes", 12)
    assert lines[-1] == (
        "Total: 15 params (30.00 B); trainable: 15 (30.00 B); non-trainable: 0 (0.00 B)"
    )


def test_bfloat16_params_are_trainable():
    layer = FlaxLayer(nn.Dense(3, param_dtype=jnp.bfloat16))
    layer.build((None, 4))
    assert _rows(_capture(layer))["params/kernel"] == ("(4, 3)", "bfloat16", "yes", 12)
