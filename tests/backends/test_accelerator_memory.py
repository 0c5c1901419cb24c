"""On the PyTorch and TensorFlow backends JAX shares the accelerator with another framework:
`import flaxlayer` makes JAX allocate on demand (and TensorFlow grow its allocation) unless
the user configured them, and only while JAX has not started its device clients.

Each case runs in a fresh process (the settings are read once per process), checked once, in
the jax session. The effect is judged where JAX reads it: the options JAX's GPU client would
be created with."""

import keras
import pytest

from flaxlayer._bridges import JAX_ALLOCATOR_SETTINGS, TENSORFLOW_GROWTH_SETTING
from helpers import run_python_json

SETTINGS = (*JAX_ALLOCATOR_SETTINGS, TENSORFLOW_GROWTH_SETTING)

CHILD = """
import os
{before}
import flaxlayer
from jaxlib import xla_client

options = xla_client.generate_pjrt_gpu_plugin_options()
report({{
    "env": {{k: os.environ.get(k) for k in {settings!r}}},
    "preallocate": options.get("preallocate"),
}})
"""


def settings_after_import(backend: str, env: dict, before: str = "") -> dict:
    if keras.backend.backend() != "jax":
        pytest.skip("each case starts its own backend: checked once, in the jax session")
    return run_python_json(
        CHILD.format(before=before, settings=SETTINGS), backend=backend, env=env, unset=SETTINGS
    )


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_jax_allocates_on_demand_next_to_another_framework(backend):
    got = settings_after_import(backend, {})
    assert got["preallocate"] is False
    assert got["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    # On TensorFlow by flaxlayer; on the other backends Keras itself sets it when imported.
    assert got["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


def test_the_jax_backend_keeps_jax_defaults():
    got = settings_after_import("jax", {})
    assert got["preallocate"] is None  # JAX's own default: preallocate
    assert all(got["env"][name] is None for name in JAX_ALLOCATOR_SETTINGS)


def test_settings_the_user_made_are_kept():
    chosen = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".40", "TF_FORCE_GPU_ALLOW_GROWTH": "false"}
    got = settings_after_import("tensorflow", chosen)
    assert got["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] is None
    assert got["preallocate"] is None
    assert got["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".40"
    assert got["env"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "false"


def test_nothing_is_set_once_jax_has_started_its_clients():
    # JAX read its allocator settings when it started: a setting made now would claim an
    # effect it cannot have.
    got = settings_after_import("torch", {}, before="import jax; jax.devices()")
    assert got["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] is None
