"""Shared test setup: the JAX backend, a clean Keras session per test, small data helpers."""

import os

# Must happen before anything imports keras (the backend) or jax (8 CPU devices, so the
# distribution tests have a mesh; single-device code still runs on the first). The suite's
# time is mostly XLA compiling tiny models: unoptimized code compiles ~20% faster, and every
# comparison in a test runs under the same flags.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)

import keras
import numpy as np
import pytest


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


def make_data(n=16, in_dim=3, out_dim=2, seed=0):
    """A tiny float32 regression data set."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, in_dim)).astype("float32")
    y = g.normal(size=(n, out_dim)).astype("float32")
    return x, y


@pytest.fixture
def data():
    return make_data()


def to_numpy(x):
    """Any backend's tensor (or a jax array) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def normal_data(n=16, dim=3, seed=0):
    """Standard-normal float32 data of shape (n, dim)."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")
