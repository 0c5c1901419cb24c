"""Multi-process data-parallel training of a FlaxLayer with `keras.distribution.DataParallel`.

Every process runs this same script. Together they form one JAX cluster
(`jax.distributed.initialize`); Keras's `DataParallel` spans the *global* device list, so the
model's variables are replicated on every device of every process and each global batch is
split across all of them. Gradients and BatchNorm statistics are reduced across processes by
XLA's collectives, so every process ends with the same weights, equal to a single-process run
on the same global batches.

Each process reads the same global data set here and feeds only its own rows of every global
batch (see `process_rows`): Keras's JAX trainer turns each process's batch into one global array
with `jax.make_array_from_process_local_data`, which takes the local data as this process's
part of the global batch.

Launch on several hosts (one process per host; host 0 is the coordinator)::

    # on host 0 (10.0.0.1)
    python multiprocess_data_parallel.py --coordinator 10.0.0.1 --port 1234 \\
        --num-processes 2 --process-id 0 --out /tmp/weights
    # on host 1
    python multiprocess_data_parallel.py --coordinator 10.0.0.1 --port 1234 \\
        --num-processes 2 --process-id 1 --out /tmp/weights

Try it on one machine (CPU only): two processes on the loopback address, each simulating
`--local-devices` CPU devices::

    python multiprocess_data_parallel.py --num-processes 2 --process-id 0 --port 1234 \\
        --local-devices 2 --small --out /tmp/weights &
    python multiprocess_data_parallel.py --num-processes 2 --process-id 1 --port 1234 \\
        --local-devices 2 --small --out /tmp/weights
    # the single-process reference: no cluster, one device, no distribution
    python multiprocess_data_parallel.py --num-processes 1 --local-devices 1 --small \\
        --out /tmp/weights

Each process writes `<out>/process_<id>_of_<n>.npz`: the final weights (by variable path, e.g.
`linen_model/mlp/params/Dense_0/kernel`), the loss per epoch (`linen_loss`), and how many
devices and processes took part. `--models linen nnx` trains an NNX module too.
"""

import argparse
import os
import sys

MODELS = ("linen", "nnx")
IN_DIM = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--coordinator", default="127.0.0.1", help="host of process 0")
    parser.add_argument("--port", type=int, default=1234, help="coordinator port")
    parser.add_argument(
        "--local-devices",
        type=int,
        default=None,
        help="simulate this many CPU devices in this process (sets XLA_FLAGS before jax loads)",
    )
    parser.add_argument("--out", default=None, help="directory for the .npz results")
    parser.add_argument("--small", action="store_true", help="tiny model and data, 2 epochs")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=["linen"],
        help="which models to train, one after the other: a Linen and/or an NNX module",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def configure_environment(args: argparse.Namespace) -> None:
    """What must be set before JAX or Keras is imported."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if args.local_devices is not None:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(
            f for f in flags.split() if "xla_force_host_platform_device_count" not in f
        )
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.local_devices}".strip()
        )


def start_cluster(args: argparse.Namespace) -> None:
    import jax

    if args.num_processes == 1:
        return
    # CPU collectives across processes (GPU/TPU clusters use their own and ignore this).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"{args.coordinator}:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=120,
    )


def make_model(kind: str, small: bool):
    """Dense -> BatchNorm -> relu -> Dense, as a Linen or an NNX module in a FlaxLayer.

    Under DataParallel, BatchNorm's statistics are those of the global batch.
    """
    import flax.linen as nn
    import keras
    from flax import nnx

    from flaxlayer import FlaxLayer

    hidden = 16 if small else 256

    class LinenMLP(nn.Module):
        hidden: int

        @nn.compact
        def __call__(self, inputs, training=False):
            x = nn.Dense(self.hidden)(inputs)
            x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
            return nn.Dense(2)(nn.relu(x))

    class NNXMLP(nnx.Module):
        def __init__(self, hidden: int, rngs: nnx.Rngs):
            self.up = nnx.Linear(IN_DIM, hidden, rngs=rngs)
            self.bn = nnx.BatchNorm(hidden, momentum=0.5, rngs=rngs)
            self.down = nnx.Linear(hidden, 2, rngs=rngs)

        def __call__(self, inputs):  # train/eval mode is set by FlaxLayer
            return self.down(nnx.relu(self.bn(self.up(inputs))))

    if kind == "linen":
        layer = FlaxLayer(LinenMLP(hidden), seed=1, name="mlp")
    else:
        # Every process creates the same values (same seed); they are then replicated.
        layer = FlaxLayer(NNXMLP(hidden, nnx.Rngs(1)), name="mlp")
    model = keras.Sequential([keras.Input((IN_DIM,)), layer], name=f"{kind}_model")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def make_data(small: bool, seed: int):
    """The global data set; every process builds the same one."""
    import numpy as np

    n = 64 if small else 4096
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, IN_DIM)).astype("float32")
    y = np.stack([x[:, :4].sum(1), x[:, 4:].prod(1)], axis=1).astype("float32")
    return x, y


def process_rows(distribution, global_batch: int, feature_shape: tuple) -> slice:
    """The rows of every global batch that this process's devices hold.

    Read from the data sharding itself, so it is right whatever order the mesh puts the
    processes' devices in.
    """
    sharding = distribution.get_data_layout((global_batch, *feature_shape)).backend_layout
    index = sharding.addressable_devices_indices_map((global_batch, *feature_shape))
    starts = [idx[0].start or 0 for idx in index.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index.values()]
    rows = slice(min(starts), max(stops))
    if (rows.stop - rows.start) * distribution.num_processes != global_batch:
        raise ValueError(f"this process's rows {rows} are not 1/num_processes of the batch")
    return rows


def local_part(array, rows: slice, global_batch: int):
    """This process's rows of each global batch, concatenated in order."""
    import numpy as np

    batches = array.reshape(-1, global_batch, *array.shape[1:])
    return np.ascontiguousarray(batches[:, rows].reshape(-1, *array.shape[1:]))


def settings(small: bool) -> tuple[int, int]:
    """(global batch size, epochs)."""
    return (16, 2) if small else (256, 5)


def train(kind: str, x, y, *, small: bool, batch_size: int, epochs: int):
    """Builds and trains one model under the active distribution (if any).

    Returns ({variable path: value}, loss per epoch). `batch_size` is per process.
    """
    import numpy as np

    model = make_model(kind, small)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    weights = {}
    for variable in model.weights:
        value = variable.value
        # Replicated on every device: this process's first shard is the whole value.
        assert value.sharding.is_fully_replicated, variable.path
        weights[variable.path] = np.asarray(value.addressable_data(0))
    return weights, np.asarray(history.history["loss"])


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_environment(args)
    start_cluster(args)

    import jax
    import keras
    import numpy as np

    keras.utils.set_random_seed(args.seed)
    devices = keras.distribution.list_devices()  # global: every process's devices
    distribution = None
    if len(devices) > 1:
        distribution = keras.distribution.DataParallel(devices=devices)
        # Each process feeds its own part of every global batch (numpy arrays, no tf.data).
        distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)

    x, y = make_data(args.small, args.seed)
    global_batch, epochs = settings(args.small)
    batch_size = global_batch
    if distribution is not None and distribution.num_processes > 1:
        rows = process_rows(distribution, global_batch, x.shape[1:])
        x, y = local_part(x, rows, global_batch), local_part(y, rows, global_batch)
        batch_size = global_batch // distribution.num_processes

    results = {}
    for kind in args.models:
        weights, losses = train(kind, x, y, small=args.small, batch_size=batch_size, epochs=epochs)
        results.update(weights)
        results[f"{kind}_loss"] = losses
        print(
            f"process {jax.process_index()}/{jax.process_count()}: {kind} model, "
            f"{len(devices)} devices ({jax.local_device_count()} local), "
            f"final loss {losses[-1]:.6f}",
            flush=True,
        )
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"process_{args.process_id}_of_{args.num_processes}.npz")
        np.savez(
            path,
            num_devices=len(devices),
            num_local_devices=jax.local_device_count(),
            num_processes=jax.process_count(),
            **results,
        )
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
