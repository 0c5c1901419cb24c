"""Shared test setup: the JAX backend, a clean Keras session per test, the `data` fixture.

The tests live in one folder per concern (core, nnx, saving, ...); the modules they share
(helpers, sample data, the model modules) live in tests/support/, put on sys.path here so that
every test file imports them by their top-level names (`import serialization_models`).
"""

import os
import sys

# Must happen before anything imports keras (the backend) or jax (8 CPU devices, so the
# distribution tests have a mesh; single-device code still runs on the first). The suite's
# time is mostly XLA compiling tiny models: unoptimized code compiles ~20% faster, and every
# comparison in a test runs under the same flags.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))
# The golden files' models: other tests load (and tamper with) those files too.
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))

import keras
import numpy as np
import pytest

from sample_data import make_data


@pytest.fixture(autouse=True)
def clean_keras_session():
    """Fresh layer-name counters (so the first FlaxLayer is 'flax_layer'), the default dtype
    policy, and a fixed random seed, so every test is deterministic on its own.

    `free_memory=False`: clear_session's gc.collect() costs ~0.5 s per test here.
    """
    keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def data():
    return make_data()
