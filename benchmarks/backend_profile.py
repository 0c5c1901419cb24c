"""Where a training step's time goes on the TensorFlow and PyTorch backends, and the fastest
step a layer that runs the module as one XLA computation could reach there.

The seed CNN (batch 32), as `flaxlayer.FlaxLayer` and as the same CNN in Keras's own layers
(Conv2D, AveragePooling2D, Flatten, Dense), each timed in four parts on the same batch, as
Keras's train step does them on that backend: the forward pass with its loss; forward +
backward (the loss's gradients with respect to the trainable variables); the whole step (the
same, then Adam's update); and Adam's update alone, of fixed gradients. Next to them, in a JAX
process, JAX's own forward + backward of the same module and loss
(`jax.jit(jax.value_and_grad(loss))`: one fused XLA program, no bridge).

The floor is JAX's forward + backward plus the backend's Adam update alone: a layer whose
backward is one computation hands every gradient over at once, so the update cannot overlap
the backward as it can with Keras's own layers. `floor / Keras layers' step` above 1 would
mean "at most the CNN in Keras layers' step" is out of reach here whatever the bridge does;
below 1, the gap between flaxlayer's step and the floor is the bridge's and the runtimes'
(two thread pools sharing the cores).

Every part is called `--calls` times per repeat, the variants interleaved, each backend in its
own process; medians over `--repeats` repeats. Writes `benchmarks/results_backend_profile.md`.

Usage: python benchmarks/backend_profile.py [--quick] [--repeats N] [--calls N] [--no-write]
(`--quick`: 2 repeats of 5 calls, nothing written: a smoke test.)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ("tensorflow", "torch")
BATCH = 32
SNIPPET = "results"  # the section docs/performance.md includes
PARTS = ("forward", "forward+backward", "step", "update")


def _batch():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    return x, y


def _model(kind: str):
    import keras
    import workloads
    from worker import native_cnn_layers

    import flaxlayer

    keras.utils.set_random_seed(0)
    layers = (
        native_cnn_layers()
        if kind == "keras layers"
        else [flaxlayer.FlaxLayer(workloads.CNN(), seed=workloads.SEED)]
    )
    model = keras.Sequential([keras.Input(workloads.CNN_INPUT), *layers])
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _tensorflow_parts(model, optimizer, x, y) -> dict:
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x, y = tf.constant(x), tf.constant(y)
    weights = model.trainable_variables

    @tf.function
    def forward():
        return loss_fn(y, model(x, training=True))

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, weights)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))
        return loss

    fixed = [tf.constant(g) for g in gradients()]

    @tf.function
    def update():
        optimizer.apply_gradients(zip(fixed, weights, strict=True))
        return optimizer.iterations

    def waited(fn):
        return lambda: tf.nest.map_structure(lambda t: t.numpy(), fn())

    return dict(zip(PARTS, map(waited, (forward, gradients, step, update)), strict=True))


def _torch_parts(model, optimizer, x, y) -> dict:
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    weights = model.trainable_weights

    def forward():
        return loss_fn(y, model(x, training=True))

    def gradients():
        for w in weights:
            w.value.grad = None
        forward().backward()
        return [w.value.grad for w in weights]

    def step():
        optimizer.apply(gradients(), weights)

    fixed = [g.clone() for g in gradients()]

    def update():
        optimizer.apply(fixed, weights)

    return dict(zip(PARTS, (forward, gradients, step, update), strict=True))


def _jax_parts(x, y) -> dict:
    import jax
    import jax.numpy as jnp
    import workloads

    module = workloads.CNN()
    params = workloads.init_params(module, workloads.CNN_INPUT)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(p):  # Keras's sparse categorical cross-entropy of probabilities
        probs = jnp.clip(module.apply(p, x), 1e-7, 1 - 1e-7)
        return -jnp.mean(jnp.log(jnp.take_along_axis(probs, y[:, None], axis=1)))

    forward, both = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    return {
        "forward": lambda: jax.block_until_ready(forward(params)),
        "forward+backward": lambda: jax.block_until_ready(both(params)),
    }


def measure(backend: str, repeats: int, calls: int) -> dict:
    """{variant: {part: median seconds per call}} in this process (KERAS_BACKEND set)."""
    x, y = _batch()
    if backend == "jax":
        variants = {"jax": _jax_parts(x, y)}
    else:
        make = _tensorflow_parts if backend == "tensorflow" else _torch_parts
        variants = {kind: make(*_model(kind), x, y) for kind in ("keras layers", "flaxlayer")}
    for parts in variants.values():
        for fn in parts.values():
            for _ in range(3):  # compiles and warms every part
                fn()
    times: dict = {v: {p: [] for p in parts} for v, parts in variants.items()}
    for _ in range(repeats):
        for variant, parts in variants.items():
            for part, fn in parts.items():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[variant][part].append((time.perf_counter() - start) / calls)
    return {v: {p: statistics.median(t) for p, t in parts.items()} for v, parts in times.items()}


def _in_process(backend: str, repeats: int, calls: int) -> dict:
    env = {**os.environ, "KERAS_BACKEND": "jax" if backend == "jax" else backend}
    env.setdefault("JAX_PLATFORMS", "cpu")
    command = [sys.executable, __file__, "--worker", backend]
    command += ["--repeats", str(repeats), "--calls", str(calls)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {backend} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict, repeats: int, calls: int) -> str:
    from workloads import cpu_name

    jax_parts = results["jax"]["jax"]
    ms = "{:.2f}".format
    lines = [
        "# Where a training step's time goes on TensorFlow and PyTorch",
        "",
        "Written by `benchmarks/backend_profile.py` (`make bench`); rerun it rather than edit.",
        "",
        f"{cpu_name()}, {os.cpu_count()} CPUs; the seed CNN, batch {BATCH}, Adam; medians of "
        f"{repeats} interleaved repeats of {calls} calls each (ms per call).",
        "",
        f"<!-- --8<-- [start:{SNIPPET}] -->",
        "| backend | variant | forward | forward + backward | step | Adam's update alone | "
        "step / Keras layers' |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    floors = []
    for backend in BACKENDS:
        native = results[backend]["keras layers"]
        for variant in ("keras layers", "flaxlayer"):
            t = results[backend][variant]
            name = "the CNN in Keras layers" if variant == "keras layers" else variant
            cells = " | ".join(ms(t[p] * 1e3) for p in PARTS)
            lines.append(f"| {backend} | {name} | {cells} | {t['step'] / native['step']:.2f}x |")
        floor = jax_parts["forward+backward"] + native["update"]
        floors.append((backend, floor, floor / native["step"]))
    lines += [
        f"| jax | `jax.jit(jax.value_and_grad(loss))`, no Keras | "
        f"{ms(jax_parts['forward'] * 1e3)} | {ms(jax_parts['forward+backward'] * 1e3)} | | | |",
        "",
        "| backend | floor: JAX's forward + backward + Adam's update alone | "
        "floor / Keras layers' step |",
        "|---|---:|---:|",
    ]
    for backend, floor, ratio in floors:
        lines.append(f"| {backend} | {ms(floor * 1e3)} | {ratio:.2f}x |")
    lines += [f"<!-- --8<-- [end:{SNIPPET}] -->", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats of 5 calls, no file")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--calls", type=int)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", choices=("jax", *BACKENDS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.calls = args.calls or (5 if args.quick else 30)
    if args.worker:
        print(json.dumps(measure(args.worker, args.repeats, args.calls)))
        return 0
    results = {b: _in_process(b, args.repeats, args.calls) for b in ("jax", *BACKENDS)}
    text = markdown(results, args.repeats, args.calls)
    print(text)
    if not args.no_write and not args.quick:
        (HERE / "results_backend_profile.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
