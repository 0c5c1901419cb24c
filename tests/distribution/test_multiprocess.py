"""Multi-process data parallelism: two JAX processes on the loopback address train FlaxLayers
(a Linen and an NNX module, both with BatchNorm) with `keras.distribution.DataParallel` over
the global device mesh (2 processes x 2 CPU devices), and end with identical weights, equal to
a single-process, single-device run.

Runs examples/multiprocess_data_parallel.py in two subprocesses (gloo CPU collectives); the
single-device reference is computed in this process with the example's own `train`.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multiprocess_data_parallel.py"
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT = 240  # seconds, for the whole multi-process run
MODELS = ("linen", "nnx")


@pytest.fixture(autouse=True)
def jax_backend_only():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution runs on the JAX backend only")
    yield
    keras.distribution.set_distribution(None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_example():
    spec = importlib.util.spec_from_file_location("multiprocess_data_parallel", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env() -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    # The example sets its own device count (--local-devices); drop the parent's.
    env.pop("XLA_FLAGS", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run_processes(out: Path) -> list[str]:
    """Starts the processes, waits for all (bounded), returns their logs; fails on error."""
    port = free_port()
    procs, logs = [], []
    for i in range(NUM_PROCESSES):
        log = open(out / f"process_{i}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(EXAMPLE),
                    "--process-id",
                    str(i),
                    "--num-processes",
                    str(NUM_PROCESSES),
                    "--coordinator",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--local-devices",
                    str(LOCAL_DEVICES),
                    "--small",
                    "--models",
                    *MODELS,
                    "--out",
                    str(out),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        )
    deadline = time.monotonic() + TIMEOUT
    timed_out = False
    try:
        # Wait for all; stop early if one fails (the other would wait for it until timeouts).
        while any(proc.poll() is None for proc in procs):
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    shown = "\n".join(f"--- process {i} ---\n{t[-3000:]}" for i, t in enumerate(texts))
    if timed_out:
        pytest.fail(f"the processes did not finish within {TIMEOUT} s:\n{shown}")
    codes = [proc.returncode for proc in procs]
    assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}:\n{shown}"
    return texts


def test_two_processes_train_like_one(tmp_path):
    texts = run_processes(tmp_path)
    results = [
        np.load(tmp_path / f"process_{i}_of_{NUM_PROCESSES}.npz") for i in range(NUM_PROCESSES)
    ]
    for i, result in enumerate(results):
        # Each process saw the global mesh: its own devices and the other's.
        assert int(result["num_processes"]) == NUM_PROCESSES, texts[i]
        assert int(result["num_local_devices"]) == LOCAL_DEVICES, texts[i]
        assert int(result["num_devices"]) == NUM_PROCESSES * LOCAL_DEVICES, texts[i]

    # The single-process, single-device reference on the same global batches.
    example = load_example()
    keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(0)
    x, y = example.make_data(True, 0)
    global_batch, epochs = example.settings(True)
    reference = {}
    for kind in MODELS:
        weights, losses = example.train(
            kind, x, y, small=True, batch_size=global_batch, epochs=epochs
        )
        assert any("batch_stats" in name or "bn/mean" in name for name in weights), kind
        reference.update(weights)
        reference[f"{kind}_loss"] = losses

    names = sorted(reference)
    for result in results:
        assert sorted(k for k in result.files if not k.startswith("num_")) == names
        for name in names:
            # Both processes hold the same replicated values...
            np.testing.assert_array_equal(result[name], results[0][name], err_msg=name)
            # ...equal to the single-device run (BatchNorm statistics and losses included).
            np.testing.assert_allclose(result[name], reference[name], atol=1e-5, err_msg=name)
