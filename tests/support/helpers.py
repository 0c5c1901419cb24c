"""The suite's helpers, one per job (fixtures live in conftest.py, data in sample_data.py).

Tensors to NumPy (`to_numpy`), a `.keras` save/load round trip (`save_load`), reading and
editing a saved `.keras` file (`read_keras_zip`, `rewrite_config`, `layer_configs`), fresh
Python processes that see this folder's model modules (`run_python*`), and looking at a layer's
variables (`weight_named`, `changed_paths`, `flax_inference`).
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import keras
import numpy as np
from flax import nnx

# This folder: the model modules a fresh process must import by name (saved `.keras` files
# record a Flax class as `module.qualname`, e.g. `serialization_models.BatchNormNet`).
SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))


def to_numpy(x):
    """Any backend's tensor (or a jax array, or a Keras variable) as a NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def save_load(model, tmp_path, name="model.keras", **load_kwargs):
    """Saves `model` to `tmp_path / name` and returns `keras.saving.load_model` of that file."""
    path = tmp_path / name
    model.save(path)
    return keras.saving.load_model(path, **load_kwargs)


def read_keras_zip(path) -> dict:
    """The members of a .keras file (a zip) as {name: bytes}."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def rewrite_config(src, dst, edit) -> None:
    """Copies the .keras file `src` to `dst`, with `edit(config)` applied to its config.json
    (in place: what `edit` returns is ignored)."""
    members = read_keras_zip(src)
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def layer_configs(config, class_name="FlaxLayer") -> list:
    """The `config` dicts of every layer of class `class_name` in a saved model config."""
    found = []
    if isinstance(config, dict):
        if config.get("class_name") == class_name and isinstance(config.get("config"), dict):
            found.append(config["config"])
        for value in config.values():
            found.extend(layer_configs(value, class_name))
    elif isinstance(config, list):
        for value in config:
            found.extend(layer_configs(value, class_name))
    return found


def only_layer_config(config, class_name="FlaxLayer") -> dict:
    """The `config` dict of the one layer of class `class_name` in a saved model config."""
    (found,) = layer_configs(config, class_name)
    return found


def run_python(
    source: str,
    *,
    backend: str | None = None,
    timeout: float = 300,
    cwd: str | None = None,
    env: dict | None = None,
    unset: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Runs `source` in a fresh Python process (this folder, SUPPORT_DIR, on sys.path).

    The child uses `backend` (default: the backend of this process) and one CPU device; it
    imports nothing but what `source` imports; `env` adds to this process's environment and
    `unset` names variables it must not have. Returns the completed process (text output).
    """
    child_env = {k: v for k, v in os.environ.items() if k not in unset} | (env or {})
    child_env["KERAS_BACKEND"] = backend or keras.backend.backend()
    # One CPU device (no mesh), and the suite's faster compiles.
    child_env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (SUPPORT_DIR, child_env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env,
    )


RESULT_MARKER = "@@RESULT@@"


def run_python_json(source: str, **kwargs) -> dict:
    """Runs `source` in a fresh process; it reports by calling `report(dict)` (predefined).

    Returns that dict; fails the test with the child's output if it crashed or never reported.
    """
    prelude = (
        "import json as _json\n"
        "def report(result):\n"
        f"    print({RESULT_MARKER!r} + _json.dumps(result), flush=True)\n"
    )
    done = run_python(prelude + textwrap.dedent(source), **kwargs)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(
        f"the child process reported nothing (exit code {done.returncode}).\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )


def run_python_reports(source: str, **kwargs) -> tuple[list, subprocess.CompletedProcess]:
    """Like `run_python_json`, but the child may call `report(dict)` any number of times.

    Returns every reported dict, in order, and the completed process (its exit code and full
    output). A child that reports once per step (e.g. once per file it loads) loses only the
    steps after a crash: the caller sees which step never reported.
    """
    prelude = (
        "import json as _json\n"
        "def report(result):\n"
        f"    print({RESULT_MARKER!r} + _json.dumps(result), flush=True)\n"
    )
    done = run_python(prelude + textwrap.dedent(source), **kwargs)
    reports = [
        json.loads(line[len(RESULT_MARKER) :])
        for line in done.stdout.splitlines()
        if line.startswith(RESULT_MARKER)
    ]
    return reports, done


def weight_named(layer, suffix: str):
    """The one variable of `layer` (a layer or a model) whose path ends with `suffix`."""
    matches = [v for v in layer.weights if v.path.endswith(suffix)]
    assert len(matches) == 1, (suffix, [v.path for v in layer.weights])
    return matches[0]


def changed_paths(before, variables) -> list[str]:
    """The paths of `variables` whose values moved away from `before` (their earlier copies)."""
    return [
        v.path for b, v in zip(before, variables, strict=True) if not np.allclose(b, to_numpy(v))
    ]


def flax_inference(layer, inputs, method=None):
    """The wrapped module's output at inference, computed by Flax itself on the layer's values.

    Linen: `module.apply(layer.flax_variables, ...)`; NNX: `layer.module` (a new module holding
    the layer's values) in eval mode. `training=False` is passed where the method takes it.
    """
    module = layer.module
    fn = getattr(module, method or "__call__")
    kwargs = {"training": False} if "training" in inspect.signature(fn).parameters else {}
    if isinstance(module, nnx.Module):
        module.eval()
        out = fn(inputs, **kwargs)
    else:
        out, _ = module.apply(layer.flax_variables, inputs, method=method, mutable=True, **kwargs)
    return jax.tree.map(np.asarray, out)


def selected_names(session, test_name: str) -> set:
    """The `name` parameters of the `test_name` tests this pytest run selected."""
    return {
        item.callspec.params["name"]
        for item in session.items
        if getattr(item, "originalname", None) == test_name
    }
