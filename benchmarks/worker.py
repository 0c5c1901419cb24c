"""A measuring process: sets up benchmark variants, then times them one at a time on request.

`run.py` starts one worker per Keras backend (KERAS_BACKEND is fixed when keras is imported) and
keeps it alive, so the variants of a comparison can be timed interleaved: one repeat of each in
turn, again and again, whichever process they live in. Only one worker measures at a time; the
others wait on their stdin.

Protocol: one JSON object per line on stdin, one reply per line on stdout, prefixed "RESULT ".
    {"cmd": "setup", "group": "fit" | "eager", "params": {...}, "variants": [...]}
    {"cmd": "measure", "key": "<group key>", "variant": "<name>"}
    {"cmd": "quit"}
A setup compiles and warms every variant (so no measurement includes compilation) and replies
with the group key, checks (e.g. that outputs agree) and versions; a measure replies with the
seconds one repeat took. Errors are replied as {"error": "..."}.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import workloads
from flax import nnx

import flaxlayer

# ---------------------------------------------------------------------------------------- fit


class FitVariant:
    """`seconds()` times `epochs` epochs of training over the group's data."""

    def __init__(self, name: str, params: dict):
        self.name, self.params = name, params

    def warm(self) -> None:
        raise NotImplementedError

    def seconds(self) -> float:
        raise NotImplementedError


def native_cnn_layers() -> list:
    """The CNN in Keras's own layers: what the backend costs without any JAX module."""
    return [
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(200, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]


class KerasFit(FitVariant):
    """`model.fit` of a Sequential model holding the layer.

    `ours`: flaxlayer.FlaxLayer; `keras`: keras.layers.FlaxLayer; `native`: the CNN written in
    Keras layers (a reference for what each backend costs by itself).
    """

    def __init__(self, name, params, data):
        super().__init__(name, params)
        kind, spe = name.split("/")
        spe = int(spe.removeprefix("spe"))
        spec = workloads.WORKLOADS[params["workload"]]
        module = spec["module"]()
        if kind == "ours":
            layers = [flaxlayer.FlaxLayer(module, seed=workloads.SEED)]
        elif kind == "keras":
            layers = [keras.layers.FlaxLayer(module)]
        elif kind == "native" and params["workload"] == "cnn":
            layers = native_cnn_layers()
        else:
            raise ValueError(f"unknown fit variant {name!r}")
        self.model = keras.Sequential([keras.Input(spec["input"]), *layers])
        self.model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=1e-3),
            loss="sparse_categorical_crossentropy",
            steps_per_execution=spe,
        )
        self.x, self.y = data

    def _fit(self, epochs: int) -> None:
        self.model.fit(
            self.x,
            self.y,
            batch_size=self.params["batch"],
            epochs=epochs,
            shuffle=False,
            verbose=0,
        )

    def warm(self):
        self._fit(1)

    def seconds(self):
        start = time.perf_counter()
        self._fit(self.params["epochs"])
        return time.perf_counter() - start


class OptaxFit(FitVariant):
    """A hand-written Flax + Optax loop, data already on device.

    `optax/step`: one jitted train step per batch (params and optimizer state donated, as Keras's
    JAX trainer does). `optax/scan`: one jitted `lax.scan` over the whole epoch, the limit for an
    overhead-bound model (no per-step dispatch at all).
    """

    def __init__(self, name, params, data):
        super().__init__(name, params)
        spec = workloads.WORKLOADS[params["workload"]]
        self.module = module = spec["module"]()
        self.tx = tx = optax.adam(1e-3)
        self.p = workloads.init_params(module, spec["input"])["params"]
        self.o = tx.init(self.p)
        batch = params["batch"]
        x, y = data
        steps = len(x) // batch
        self.xs = jnp.asarray(x[: steps * batch].reshape(steps, batch, *x.shape[1:]))
        self.ys = jnp.asarray(y[: steps * batch].reshape(steps, batch))
        self.batches = [(self.xs[i], self.ys[i]) for i in range(steps)]

        def loss_fn(p, xb, yb):
            return workloads.sparse_categorical_crossentropy(module.apply({"params": p}, xb), yb)

        def step(p, o, xb, yb):
            loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        def epoch(p, o, xs, ys):
            def body(carry, batch):
                p, o, loss = step(*carry, *batch)
                return (p, o), loss

            (p, o), losses = jax.lax.scan(body, (p, o), (xs, ys))
            return p, o, losses

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.epoch = jax.jit(epoch, donate_argnums=(0, 1))
        self.scan = name == "optax/scan"

    def _run(self, epochs: int) -> None:
        p, o = self.p, self.o
        for _ in range(epochs):
            if self.scan:
                p, o, loss = self.epoch(p, o, self.xs, self.ys)
            else:
                for xb, yb in self.batches:
                    p, o, loss = self.step(p, o, xb, yb)
        jax.block_until_ready((p, o, loss))
        self.p, self.o = p, o

    def warm(self):
        self._run(1)

    def seconds(self):
        start = time.perf_counter()
        self._run(self.params["epochs"])
        return time.perf_counter() - start


def setup_fit(params: dict, variants: list[str]) -> tuple[dict, dict]:
    spec = workloads.WORKLOADS[params["workload"]]
    data = workloads.classification_data(spec["input"], params["n"])
    made = {}
    for name in variants:
        cls = OptaxFit if name.startswith("optax/") else KerasFit
        made[name] = cls(name, params, data)
        made[name].warm()
    return made, {}


# -------------------------------------------------------------------------------------- eager


def _sync(out):
    if keras.backend.backend() == "jax":
        jax.block_until_ready(out)
    return out


class EagerVariant:
    """`seconds()` is the mean latency of `calls` calls, each waited for."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 1

    def once(self):
        return _sync(self.fn())

    def calibrate(self, budget: float) -> None:
        self.once()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < budget / 4 or n < 2:
            self.once()
            n += 1
        per_call = (time.perf_counter() - start) / n
        self.calls = int(min(5000, max(3, budget / per_call)))

    def seconds(self):
        fn = self.fn
        start = time.perf_counter()
        for _ in range(self.calls):
            _sync(fn())
        return (time.perf_counter() - start) / self.calls


def _block_call_fn(module):
    def call_fn(params, state, inputs, training):
        if training:
            out, new = module.apply(
                {"params": params, **state}, inputs, True, mutable=["batch_stats"]
            )
            return out, new
        return module.apply({"params": params, **state}, inputs, False), state

    return call_fn


def setup_eager(params: dict, variants: list[str]) -> tuple[dict, dict]:
    """The block MLP at one batch size: eager calls on the backend's tensors (`call`) and on
    NumPy arrays (`callnp`), predict_on_batch, the jitted apply on each (`jit`, `jitnp`)."""
    batch = params["batch"]
    x_np = workloads.block_inputs(batch)
    x = keras.ops.convert_to_tensor(x_np)
    module = workloads.BlockMLP()
    variables = workloads.init_params(module, (workloads.BLOCK_FEATURES,))
    apply = jax.jit(module.apply)

    def own_copy():  # Keras's trainers donate variable buffers: no two users share one
        return jax.tree.map(jnp.copy, variables)

    x_jax = jnp.asarray(x_np)
    reference = np.asarray(apply(variables, x_jax))

    layers, models = _eager_layers(module, variants, own_copy)
    inputs = {"jit": x_jax, "jitnp": x_np, "call": x, "callnp": x_np}
    made, checks = {}, {}
    for name in variants:
        kind, what = name.split("/")
        made[name] = EagerVariant(_eager_fn(kind, what, layers, models, apply, variables, inputs))
        out = np.asarray(keras.ops.convert_to_numpy(made[name].once()))
        if kind != "nnx":  # the NNX network has its own initial values
            checks[f"{name} max |diff| vs jit(module.apply)"] = float(
                np.max(np.abs(out - reference))
            )
    for variant in made.values():
        variant.calibrate(params["budget"])
    return made, checks


def _eager_layers(module, variants: list[str], own_copy) -> tuple[dict, dict]:
    """The layers the eager variants call, and the models `predict` variants use."""
    layers = {}
    if any(v.startswith("ours/") for v in variants):
        layers["ours"] = flaxlayer.FlaxLayer(module, variables=own_copy())
    if any(v.startswith("keras/") for v in variants):
        layers["keras"] = keras.layers.FlaxLayer(module, variables=own_copy())
    if any(v.startswith("nnx/") for v in variants):
        layers["nnx"] = flaxlayer.FlaxLayer(workloads.BlockMLPNNX(nnx.Rngs(workloads.SEED)))
    if any(v.startswith("jaxlayer/") for v in variants):
        copy = own_copy()
        layers["jaxlayer"] = flaxlayer.JaxLayer(
            _block_call_fn(module),
            params=copy["params"],
            state={"batch_stats": copy["batch_stats"]},
        )
    models = {
        kind: keras.Sequential([keras.Input((workloads.BLOCK_FEATURES,)), layers[kind]])
        for kind in ("ours", "keras")
        if f"{kind}/predict" in variants
    }
    return layers, models


def _eager_fn(kind, what, layers, models, apply, variables, inputs):
    """The call one eager variant times: `apply/jit[np]`, `<kind>/call[np]` or a predict."""
    if kind == "apply":
        return lambda x=inputs[what]: apply(variables, x)
    if what in ("call", "callnp"):
        return lambda layer=layers[kind], x=inputs[what]: layer(x)
    return lambda model=models[kind], x=inputs["callnp"]: model.predict_on_batch(x)


# ------------------------------------------------------------------------------------- server

SETUPS = {"fit": setup_fit, "eager": setup_eager}


def _versions() -> dict:
    from importlib.metadata import version

    out = {"backend": keras.backend.backend()}
    for dist in ("jax", "flax", "keras", "optax"):
        out[dist] = version(dist)
    if keras.backend.backend() == "tensorflow":
        out["tensorflow"] = version("tensorflow-cpu")
    if keras.backend.backend() == "torch":
        out["torch"] = version("torch")
    out["flaxlayer"] = flaxlayer.__version__
    return out


def _reply(obj: dict) -> None:
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve() -> None:
    groups: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            if request["cmd"] == "quit":
                _reply({"ok": True})
                return
            if request["cmd"] == "setup":
                keras.utils.set_random_seed(workloads.SEED)
                key = request["key"]
                groups[key], checks = SETUPS[request["group"]](
                    request["params"], request["variants"]
                )
                _reply({"key": key, "checks": checks, "versions": _versions()})
            elif request["cmd"] == "measure":
                variant = groups[request["key"]][request["variant"]]
                _reply({"seconds": variant.seconds()})
            else:
                raise ValueError(f"unknown command {request['cmd']!r}")
        except Exception as e:  # reported to run.py, which stops with the traceback
            _reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
    serve()
