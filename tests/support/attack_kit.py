"""The safe-loading attack harness: crafted .keras files, judged by what loading them does.

Each attack saves a small legitimate model (a Dense of a few units on 3 inputs), edits a copy's
config.json as an attacker would, and loads it with `keras.saving.load_model(path)` (default
safe mode) in a fresh process whose script imported only keras, flaxlayer and the user's own
model file (`attack_user_models.py`; Net, WideNet, Mlp and write_report imported from it into
`__main__`) and defined two helpers of its own (`script_report`, which writes a file, and
`double`). Per file the child reports: whether it loaded (and its predictions), the exception's
type and message, which process-wide settings changed (numpy print options, Flax's NNX
variable-type and data-type registries, Flax's state-dict registry, Linen named_call, logical
axis rules, jax.config), what was printed, which Flax API methods ran (Module.tabulate, ...),
and how far peak memory rose; the parent checks which files were written. Every refusal must
be a `flaxlayer.SerializationError` (exported by the package), raised by flaxlayer itself.

Two child processes per backend, run side by side, serve every attack test of a pytest session
(tests/saving/attacks/conftest.py): one loads the controls and the cheap attacks one after the
other; the other loads a control, a baseline and the attacks sized to exhaust memory, each in a
fork of itself taken before it ran any JAX code, so that each file's peak memory is measured
alone (from /proc/self/status VmHWM, reset through clear_refs), not hidden in memory an earlier
file left resident. Children report after every file, so a crash loses only that file.

This module holds what every attack file shares: the config entry builders, the base models,
`Attack` and the edits attacks are made of, the child, and the judging. Each
tests/saving/attacks/test_attack_*.py file defines its attack class as `ATTACKS` (collected by
the conftest for the two children) and its tests.
"""

import concurrent.futures
import dataclasses
import functools
import json
import re
import sys
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx

import attack_user_models as um
from flaxlayer import FlaxLayer, JaxLayer
from helpers import layer_configs, rewrite_config, run_python_reports

TAG = "__flaxlayer__"
X = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
# Peak memory a memory attack may add to what loading the untampered file takes (BASELINE):
# far below every such attack's size (1 GB to 3 GB here, measured on the first version).
MAX_RISE_MIB = 300
# Printed by an attack that gets to print: must appear in no output of any child.
PWNED = "PWNED"
# Keras's own wrapper around errors raised while loading the weights (load_own_variables):
# `_raise_loading_failure` re-raises them as a plain ValueError quoting their message.
KERAS_WEIGHTS_WRAPPER = "could not be loaded"


# --------------------------------------------------------------------- config entry builders


def ref(module: str, qualname: str) -> dict:
    return {"module": module, "qualname": qualname}


def fn(module: str, qualname: str) -> dict:
    return {TAG: "function", **ref(module, qualname)}


def class_entry(module: str, qualname: str) -> dict:
    return {TAG: "class", "class": ref(module, qualname)}


def module_entry(module: str, qualname: str, **fields) -> dict:
    return {TAG: "module", "class": ref(module, qualname), "fields": fields}


def partial(func: dict, *args, **keywords) -> dict:
    return {TAG: "partial", "func": func, "args": list(args), "keywords": keywords}


def tup(*items) -> dict:
    return {TAG: "tuple", "items": list(items)}


def pydict(**items) -> dict:
    return {TAG: "dict", "items": [[k, v] for k, v in items.items()]}


def dtype_entry(name: str) -> dict:
    return {TAG: "dtype", "name": name}


def scalar(dtype: str, value) -> dict:
    return {TAG: "scalar", "dtype": dtype, "value": value}


def factory(module: str, qualname: str, kwargs: dict) -> dict:
    return {TAG: "factory", "factory": ref(module, qualname), "kwargs": kwargs}


def layer_config(config: dict) -> dict:
    """The config of the model's one flaxlayer layer (FlaxLayer or JaxLayer)."""
    found = layer_configs(config, "FlaxLayer") + layer_configs(config, "JaxLayer")
    (layer,) = found
    return layer


def layer_entry(config: dict) -> dict:
    """The model's one flaxlayer layer entry (class_name, config, build_config)."""
    for entry in config["config"]["layers"]:
        if entry["class_name"] in ("FlaxLayer", "JaxLayer"):
            return entry
    raise AssertionError("no flaxlayer layer in the config")


def module_of(config: dict) -> dict:
    return layer_config(config)["module"]


# ----------------------------------------------------------------------------- base models


def variance_scaling():
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _jax_layer():
    g = np.random.default_rng(1)
    params = {"w": g.normal(size=(3, 2)).astype("float32"), "b": np.zeros((2,), "float32")}
    return JaxLayer(um.affine, params=params)


# name -> (make the layer, compile the model)
BASES: dict[str, tuple[Callable, bool]] = {
    "net": (lambda: FlaxLayer(um.Net(4, act=jax.nn.gelu, kernel_init=variance_scaling())), False),
    "net_tanh": (
        lambda: FlaxLayer(um.Net(4, act=jnp.tanh, kernel_init=nn.initializers.normal(0.1))),
        False,
    ),
    "net_user_act": (lambda: FlaxLayer(um.Net(4, act=um.scaled_tanh)), False),
    "net_reduction": (
        lambda: FlaxLayer(um.Net(4, act=functools.partial(jnp.mean, axis=-1, keepdims=True))),
        False,
    ),
    "net_compiled": (lambda: FlaxLayer(um.Net(4)), True),
    "net_method": (lambda: FlaxLayer(um.Net(4), method="logits"), False),
    "widenet_method": (lambda: FlaxLayer(um.WideNet(), method="logits"), False),
    "mlp": (lambda: FlaxLayer(um.Mlp(3, 2, rngs=nnx.Rngs(0))), False),
    "mlp_dropout": (lambda: FlaxLayer(um.DropoutMlp(3, 2, rngs=nnx.Rngs(0))), False),
    "mlp_method": (lambda: FlaxLayer(um.Mlp(3, 2, rngs=nnx.Rngs(0)), method="hidden"), False),
    "tolinen": (lambda: FlaxLayer(nnx.bridge.ToLinen(um.Mlp, args=(3, 2))), False),
    "dense": (lambda: FlaxLayer(nn.Dense(4)), False),
    "jaxlayer": (_jax_layer, False),
}


def _main_class():
    """A Linen class that lives in `__main__`, as one defined in the user's script does."""

    class LocalNet(nn.Module):
        __module__ = "__main__"
        __qualname__ = "LocalNet"
        features: int = 4

        @nn.compact
        def __call__(self, inputs):
            return nn.Dense(self.features)(inputs)

    return LocalNet


def _save(layer, path, compiled=False) -> list:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), layer])
    if compiled:
        model.compile(optimizer="sgd", loss="mse")  # plain SGD: no optimizer slot variables
    model.save(path)
    return np.asarray(model.predict(X, verbose=0)).tolist()


@dataclasses.dataclass
class Saved:
    paths: dict
    predictions: dict
    main_class_warnings: list


def save_bases(directory) -> Saved:
    """Every base model saved into `directory`, with its predictions on X; the `__main__`
    class's model too, with the warnings saving it gave."""
    paths, predictions = {}, {}
    for name, (make, compiled) in BASES.items():
        keras.backend.clear_session(free_memory=False)
        paths[name] = directory / f"{name}.keras"
        predictions[name] = _save(make(), paths[name], compiled)
    # A model whose module class is defined in `__main__`, as in a user's script.
    main = sys.modules["__main__"]
    cls = _main_class()
    had = hasattr(main, "LocalNet")
    old = getattr(main, "LocalNet", None)
    main.LocalNet = cls
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras.backend.clear_session(free_memory=False)
            paths["main_class"] = directory / "main_class.keras"
            _save(FlaxLayer(cls()), paths["main_class"])
    finally:
        if had:
            main.LocalNet = old
        else:
            del main.LocalNet
    keras.backend.clear_session(free_memory=False)
    return Saved(paths, predictions, [(w.category, str(w.message)) for w in caught])


# ----------------------------------------------------------------- attacks and their edits


@dataclasses.dataclass
class Attack:
    """One crafted file: a base model, an edit of its config.json, and how to judge it.

    `edit(config, target)` edits the whole config dict in place; `target` is a path the
    attack tries to write (it must not exist afterwards). `needles` must all appear in the
    error message (a tuple among them: any one of its alternatives). `weights_error`: the
    failure can only show when the weights are read, where Keras wraps every error in its own
    ValueError quoting ours (accepted, with our text).
    """

    name: str
    base: str
    edit: Callable | None = None
    needles: tuple = ()
    child: str = "main"
    load: dict = dataclasses.field(default_factory=dict)
    custom_objects: tuple = ()
    weights_error: bool = False
    predict: bool = True


def on_module(change: Callable) -> Callable:
    """An edit of the FlaxLayer's module entry: change(module_entry, target)."""
    return lambda config, target: change(module_of(config), target)


def set_field(name: str, value) -> Callable:
    return on_module(lambda m, t: m["fields"].__setitem__(name, value))


def call_at_build(func: dict, *args, **keywords) -> Callable:
    """nn.Dense calls its `dot_general_cls` field with no arguments in __call__ (at build)."""
    return set_field("dot_general_cls", partial(func, *args, **keywords))


def chain(*edits: Callable) -> Callable:
    def edit(config, target):
        for e in edits:
            e(config, target)

    return edit


def write_report_at_build(config, target):
    """nn.Dense's dot_general_cls -> the user's write_report(target, "PWNED")."""
    module_of(config)["fields"]["dot_general_cls"] = partial(
        fn("attack_user_models", "write_report"), str(target), PWNED
    )


def method_by_name(name: str, kind: str = "name") -> Callable:
    return lambda config, target: layer_config(config).__setitem__(
        "method", {"kind": kind, "name": name}
    )


def tolinen(**fields) -> Callable:
    """Replaces the ToLinen fields; `target` (the path) may be used by a callable value."""

    def edit(config, target):
        module = module_of(config)
        module["fields"] = {k: (v(str(target)) if callable(v) else v) for k, v in fields.items()}

    return edit


def nested_lists(depth: int):
    value: list | int = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_tuples(depth: int):
    value: dict | int = 1
    for _ in range(depth):
        value = tup(value)
    return value


def nested_dicts(depth: int):
    value: dict | int = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def custom_config(config, target):
    module = module_of(config)
    module.pop("fields")
    module["custom_config"] = {"features": 4}


def nnx_attr(path: str, key: str, value) -> Callable:
    """Sets `key` of the NNX entry at attribute path `path` (dots) of the root node."""

    def edit(config, target):
        node = module_of(config)
        for part in path.split(".") if path else ():
            node = node["attributes"][part]
        node[key] = value

    return edit


def nnx_metadata(path: str, key: str, value) -> Callable:
    """Adds `key: value` to the metadata of the NNX variable at attribute path `path`."""

    def edit(config, target):
        node = module_of(config)
        *nodes, variable = path.split(".")
        for part in nodes:
            node = node["attributes"][part]
        node["attributes"][variable]["metadata"]["items"].append([key, value])

    return edit


def nnx_widen(hidden: int) -> Callable:
    """Mlp's hidden width set to `hidden` in every place the config records it."""

    def edit(config, target):
        nodes = module_of(config)["attributes"]
        first, second = nodes["linear1"]["attributes"], nodes["linear2"]["attributes"]
        first["kernel"]["shape"] = [3, hidden]
        first["bias"]["shape"] = [hidden]
        first["out_features"] = hidden
        second["kernel"]["shape"] = [hidden, 2]
        second["in_features"] = hidden

    return edit


def input_spec(shape: list) -> Callable:
    def edit(config, target):
        layer_entry(config)["build_config"]["input_spec"]["shape"] = shape

    return edit


def jax_param_shape(name: str, shape: list) -> Callable:
    def edit(config, target):
        params = layer_config(config)["params"]
        entries = dict(params["dict"])
        entries[name]["shape"] = shape
        params["dict"] = [[k, v] for k, v in entries.items()]

    return edit


def given_variables(tree: dict) -> Callable:
    """A FlaxLayer `variables` entry (the shapes a decode cache was given at) written into the
    layer's config: {collection: {path part: ...: [shape]}} of float32 leaves."""

    def spec(node):
        if isinstance(node, dict):
            return {"dict": [[k, spec(v)] for k, v in node.items()]}
        return {"shape": node, "dtype": "float32"}

    def edit(config, target):
        layer_config(config)["variables"] = spec(tree)

    return edit


# The memory child loads this control first (so that a memory test cannot pass because loading
# is broken there); the main child loads it among the other controls.
WARM_UP_CONTROL = Attack("control_linen_gelu_variance_scaling", "net")
# What loading a legitimate file takes in a fresh fork (runtime start-up, the small weights):
# the memory attacks may add MAX_RISE_MIB to it, no more.
BASELINE = Attack("baseline_load_without_predict", "net", child="memory", predict=False)


# ------------------------------------------------------------------------------ the child

CHILD = r'''
import keras

import attack_user_models  # noqa: F401 - the user's model file
import flaxlayer  # noqa: F401
from attack_user_models import Mlp, Net, WideNet, write_report  # noqa: F401

try:
    from flaxlayer import SerializationError
except ImportError:  # not exported (yet): every refusal test fails on it
    SerializationError = None


def script_report(path, text):
    """The script's own helper: defined in __main__, writes a file."""
    with open(path, "w") as f:
        f.write(f"{text}\n")


def double(x):
    """The script's own activation, trusted explicitly through custom_objects."""
    return 2.0 * x


from load_probe import API_CALLS, monitor_flax_api as _monitor_flax_api, observe as _observe
from load_probe import peak_kib as _peak_kib, reset_peak as _reset_peak, restore as _restore
from load_probe import snapshot as _snapshot, status_kib as _status_kib


def _describe(fn):
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _attempt(entry, x):
    import contextlib
    import gc
    import io
    import warnings

    import numpy as np

    import time

    start = time.perf_counter()
    result = {"name": entry["name"], "exported": SerializationError is not None}
    kwargs = dict(entry["load"])
    if entry["custom_objects"]:
        kwargs["custom_objects"] = {n: globals()[n] for n in entry["custom_objects"]}
    snapshot = _snapshot()
    before = _observe()
    API_CALLS.clear()
    reset = _reset_peak()
    base = _status_kib("VmRSS") if reset else _peak_kib()
    out = io.StringIO()
    caught = []
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(entry["path"], **kwargs)
            result["loaded"] = True
            if entry["predict"]:
                result["prediction"] = np.asarray(model.predict(x, verbose=0)).tolist()
            module = getattr(model.layers[-1], "module", None) if model.layers else None
            result["act"] = _describe(getattr(module, "act", None))
            del model, module
    except Exception as e:  # noqa: BLE001 - judged by the parent
        result["loaded"] = False
        result["error_type"] = type(e).__name__
        result["error_module"] = type(e).__module__
        result["error"] = str(e)[:6000]
        result["is_serialization_error"] = SerializationError is not None and isinstance(
            e, SerializationError
        )
    result["peak_rise_mib"] = round((_peak_kib() - base) / 1024, 1)
    result["peak_reset"] = reset
    result["rss_before_mib"] = round(base / 1024, 1)
    result["stdout"] = out.getvalue()[-3000:]
    result["warnings"] = [f"{w.category.__name__}: {w.message}"[:500] for w in caught]
    result["api_calls"] = list(API_CALLS)
    after = _observe()
    result["changed"] = sorted(k for k in before if before[k] != after[k])
    _restore(snapshot)
    keras.backend.clear_session(free_memory=False)
    result["seconds"] = round(time.perf_counter() - start, 2)
    report(result)


def _main():
    import json
    import os

    import numpy as np

    with open(os.environ["FLAXLAYER_ATTACK_PLAN"]) as f:
        plan = json.load(f)
    x = np.asarray(plan["x"], "float32")
    _monitor_flax_api()
    report({"started": True, "exported": SerializationError is not None})
    for entry in plan["files"]:
        if plan["fork"]:
            _attempt_in_fork(entry, x)
        else:
            _attempt(entry, x)
    report({"finished": True})


def _attempt_in_fork(entry, x):
    """Loads the file in a forked copy of this process, which exits after reporting.

    Every file starts from the same memory (nothing an earlier file allocated, freed or kept
    can hide or inflate this one's peak), and a crash loses only this file. This process has
    only imported modules, never run JAX (no backend, no compiled code), so forking is safe.
    """
    import os
    import sys

    import signal
    import time

    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            _attempt(entry, x)
        finally:
            sys.stdout.flush()
            os._exit(0)
    deadline = time.monotonic() + 300
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        report({"name": entry["name"], "crashed": status})


_main()
'''


@dataclasses.dataclass
class ChildRun:
    results: dict
    stdout: str
    stderr: str
    returncode: int
    targets: dict

    def result(self, name: str) -> dict:
        if name not in self.results:
            raise AssertionError(
                f"the child never reported {name!r} (it crashed on this file or before it; "
                f"exit code {self.returncode}).\n--- stderr\n{self.stderr[-6000:]}"
            )
        result = self.results[name]
        if "crashed" in result:
            raise AssertionError(
                f"loading {name!r} killed the process (wait status {result['crashed']}).\n"
                f"--- stderr\n{self.stderr[-6000:]}"
            )
        return result


def run_child(saved: Saved, attacks: list, directory, *, fork: bool) -> ChildRun:
    files, targets = [], {}
    for attack in attacks:
        target = directory / f"{attack.name}.written"
        targets[attack.name] = target
        path = directory / f"{attack.name}.keras"
        edit = attack.edit
        rewrite_config(
            saved.paths[attack.base],
            path,
            (lambda config, e=edit, t=target: e(config, t)) if edit else (lambda config: None),
        )
        files.append(
            {
                "name": attack.name,
                "path": str(path),
                "load": attack.load,
                "custom_objects": list(attack.custom_objects),
                "predict": attack.predict,
            }
        )
    plan = directory / "plan.json"
    plan.write_text(json.dumps({"x": X.tolist(), "files": files, "fork": fork}))
    reports, done = run_python_reports(CHILD, env={"FLAXLAYER_ATTACK_PLAN": str(plan)}, timeout=900)
    results = {r["name"]: r for r in reports if "name" in r}
    return ChildRun(results, done.stdout, done.stderr, done.returncode, targets)


def run_children(saved: Saved, attacks: list, tmp_path_factory) -> dict:
    """The two children, run side by side: "main" loads the controls and every attack but the
    memory ones, one after the other; "memory" loads WARM_UP_CONTROL, BASELINE, then the memory
    attacks, each in a fork of itself taken before it ran any JAX code, its peak memory
    measured from there. Returns {"main": ChildRun, "memory": ChildRun}."""
    attack_names = [a.name for a in attacks]
    assert len(set(attack_names)) == len(attack_names), "attack names must be unique"
    main = [a for a in attacks if a.child == "main"]
    memory = [WARM_UP_CONTROL, BASELINE] + [a for a in attacks if a.child == "memory"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            "main": pool.submit(
                run_child, saved, main, tmp_path_factory.mktemp("attacks"), fork=False
            ),
            "memory": pool.submit(
                run_child,
                saved,
                memory,
                tmp_path_factory.mktemp("memory"),
                fork=sys.platform.startswith("linux"),
            ),
        }
        return {k: f.result() for k, f in futures.items()}


# ---------------------------------------------------------------------------------- judging


def no_side_effects(run: ChildRun, attack: Attack, result: dict) -> None:
    assert not run.targets[attack.name].exists(), (
        f"{attack.name}: loading wrote {run.targets[attack.name]}: "
        f"{run.targets[attack.name].read_text()[:200]!r}"
    )
    assert result["changed"] == [], f"{attack.name}: loading changed {result['changed']}"
    assert PWNED not in result["stdout"], f"{attack.name} printed: {result['stdout'][-500:]!r}"


def refused(run: ChildRun, attack: Attack) -> dict:
    """The load failed with flaxlayer's SerializationError, naming what it should, and did
    nothing else."""
    result = run.result(attack.name)
    no_side_effects(run, attack, result)
    assert not result["loaded"], f"{attack.name}: the tampered file loaded"
    message = result["error"]
    ours = result["is_serialization_error"]  # isinstance of flaxlayer.SerializationError
    wrapped = (
        attack.weights_error
        and result["error_type"] == "ValueError"
        and KERAS_WEIGHTS_WRAPPER in message
    )
    if not (ours or wrapped):
        note = "" if result["exported"] else " (flaxlayer does not export SerializationError)"
        pytest.fail(
            f"{attack.name}: expected flaxlayer.SerializationError{note}, got "
            f"{result['error_module']}.{result['error_type']}: {message[:1500]}"
        )
    for needle in attack.needles:
        alternatives = needle if isinstance(needle, tuple) else (needle,)
        assert any(names_it(message, n) for n in alternatives), (
            f"{attack.name}: the message does not name {' or '.join(map(repr, alternatives))}: "
            f"{message[:1500]}"
        )
    return result


def names_it(message: str, needle: str) -> bool:
    if needle.isidentifier():  # as a word: "act" is not found in "exact"
        return re.search(rf"\b{re.escape(needle)}\b", message) is not None
    return needle in message


def names_of(attacks: list) -> list[str]:
    return [a.name for a in attacks]
