"""Issue 13, "Safe loading, hardened": crafted .keras files, judged by what loading them does.

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

Two child processes per backend, run side by side, serve every test: one loads the controls and
the cheap attacks one after the other; the other loads a control, a baseline and the attacks
sized to exhaust memory, each in a fork of itself taken before it ran any JAX code, so that each
file's peak memory is measured alone (from /proc/self/status VmHWM, reset through clear_refs),
not hidden in memory an earlier file left resident. Children report after every file, so a
crash loses only that file.

Issue points covered (docstrings below say which): 1 classes and trust, 2 Flax's bridge
classes, 3 the explicit allow-list, 4 `method` by name, 5 memory sized by the config, 6 errors
and `__main__` classes, 7 legitimate files keep loading (the controls, in the same setup).
"""

import concurrent.futures
import dataclasses
import functools
import json
import os
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
import serialization_models as sm
from flaxlayer import FlaxLayer, JaxLayer
from helpers import RESULT_MARKER, run_python_reports

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
    found = sm.layer_configs(config, "FlaxLayer") + sm.layer_configs(config, "JaxLayer")
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


def _variance_scaling():
    return nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _jax_layer():
    g = np.random.default_rng(1)
    params = {"w": g.normal(size=(3, 2)).astype("float32"), "b": np.zeros((2,), "float32")}
    return JaxLayer(um.affine, params=params)


# name -> (make the layer, compile the model)
BASES: dict[str, tuple[Callable, bool]] = {
    "net": (lambda: FlaxLayer(um.Net(4, act=jax.nn.gelu, kernel_init=_variance_scaling())), False),
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """Every base model saved once per backend, with its predictions on X."""
    directory = tmp_path_factory.mktemp("bases")
    paths, predictions = {}, {}
    for name, (make, compiled) in BASES.items():
        keras.backend.clear_session(free_memory=False)
        paths[name] = directory / f"{name}.keras"
        predictions[name] = _save(make(), paths[name], compiled)
    # A model whose module class is defined in `__main__` (issue point 6).
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


# ------------------------------------------------------------------------------ the attacks


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


def _chain(*edits: Callable) -> Callable:
    def edit(config, target):
        for e in edits:
            e(config, target)

    return edit


def _write_report_at_build(config, target):
    """nn.Dense's dot_general_cls -> the user's write_report(target, "PWNED")."""
    module_of(config)["fields"]["dot_general_cls"] = partial(
        fn("attack_user_models", "write_report"), str(target), PWNED
    )


def _method(name: str, kind: str = "name") -> Callable:
    return lambda config, target: layer_config(config).__setitem__(
        "method", {"kind": kind, "name": name}
    )


def _tolinen(**fields) -> Callable:
    """Replaces the ToLinen fields; `target` (the path) may be used by a callable value."""

    def edit(config, target):
        module = module_of(config)
        module["fields"] = {k: (v(str(target)) if callable(v) else v) for k, v in fields.items()}

    return edit


def _nested_lists(depth: int):
    value: list | int = 1
    for _ in range(depth):
        value = [value]
    return value


def _nested_tuples(depth: int):
    value: dict | int = 1
    for _ in range(depth):
        value = tup(value)
    return value


def _nested_dicts(depth: int):
    value: dict | int = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _custom_config(config, target):
    module = module_of(config)
    module.pop("fields")
    module["custom_config"] = {"features": 4}


def _nnx_attr(path: str, key: str, value) -> Callable:
    """Sets `key` of the NNX entry at attribute path `path` (dots) of the root node."""

    def edit(config, target):
        node = module_of(config)
        for part in path.split(".") if path else ():
            node = node["attributes"][part]
        node[key] = value

    return edit


def _nnx_metadata(path: str, key: str, value) -> Callable:
    """Adds `key: value` to the metadata of the NNX variable at attribute path `path`."""

    def edit(config, target):
        node = module_of(config)
        *nodes, variable = path.split(".")
        for part in nodes:
            node = node["attributes"][part]
        node["attributes"][variable]["metadata"]["items"].append([key, value])

    return edit


def _nnx_widen(hidden: int) -> Callable:
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


def _input_spec(shape: list) -> Callable:
    def edit(config, target):
        layer_entry(config)["build_config"]["input_spec"]["shape"] = shape

    return edit


def _jax_param_shape(name: str, shape: list) -> Callable:
    def edit(config, target):
        params = layer_config(config)["params"]
        entries = dict(params["dict"])
        entries[name]["shape"] = shape
        params["dict"] = [[k, v] for k, v in entries.items()]

    return edit


CONTROLS = [
    # Issue point 7: each loads in the same fresh-process setup and predicts what it did.
    Attack("control_linen_gelu_variance_scaling", "net"),
    Attack("control_linen_tanh_normal_init", "net_tanh"),
    Attack("control_linen_user_activation", "net_user_act"),
    Attack("control_linen_partial_of_reduction", "net_reduction"),
    Attack("control_linen_compiled", "net_compiled"),
    Attack("control_method_by_name", "net_method"),
    Attack("control_method_inherited_from_user_base", "widenet_method"),
    Attack("control_nnx", "mlp"),
    Attack("control_nnx_method_by_name", "mlp_method"),
    Attack("control_tolinen_user_nnx_class", "tolinen"),
    Attack("control_jaxlayer_registered_call", "jaxlayer"),
]
# Loads, with a function the script passed in custom_objects (Keras's explicit trust).
CUSTOM_OBJECTS_CONTROL = Attack(
    "control_custom_objects_function",
    "net",
    set_field("act", fn("__main__", "double")),
    custom_objects=("double",),
)

CLASS_ATTACKS = [
    # Named `__main__`, where the script merely imported the class from attack_user_models.
    Attack(
        "class_named_in_main_linen",
        "net",
        on_module(lambda m, t: m.__setitem__("class", ref("__main__", "Net"))),
        ("__main__", "Net"),
    ),
    Attack(
        "class_named_in_main_nnx",
        "mlp",
        on_module(lambda m, t: m.__setitem__("class", ref("__main__", "Mlp"))),
        ("__main__", "Mlp"),
    ),
    Attack(
        "class_named_in_main_tolinen_nnx_class",
        "tolinen",
        set_field("nnx_class", class_entry("__main__", "Mlp")),
        ("__main__", "Mlp"),
    ),
    # A re-export is not the defining module.
    Attack(
        "class_named_through_reexport",
        "dense",
        on_module(lambda m, t: m.__setitem__("class", ref("flax.linen", "Dense"))),
        ("flax.linen", "Dense"),
    ),
    # Subclass of what the position requires.
    Attack(
        "class_variable_type_as_linen_module",
        "net",
        on_module(lambda m, t: m.__setitem__("class", ref("flax.nnx.variablelib", "Param"))),
        ("Param",),
    ),
    Attack(
        "class_nnx_module_as_linen_module",
        "net",
        on_module(lambda m, t: m.__setitem__("class", ref("attack_user_models", "Mlp"))),
        ("Mlp",),
    ),
    Attack(
        "class_variable_type_as_nnx_node",
        "mlp",
        _nnx_attr("linear1", "class", ref("flax.nnx.variablelib", "Param")),
        ("Param",),
    ),
    Attack(
        "class_linen_module_as_nnx_variable",
        "mlp",
        _nnx_attr("linear1.kernel", "class", ref("attack_user_models", "Net")),
        ("Net",),
    ),
]

TRUST_ATTACKS = [
    # Library classes only (nn.Dense); an unused class entry in a key nobody reads.
    Attack(
        "trust_from_class_entry_in_unread_key",
        "dense",
        _chain(
            on_module(
                lambda m, t: m.__setitem__("decoy", class_entry("attack_user_models", "Net"))
            ),
            _write_report_at_build,
        ),
        (("decoy", "write_report"),),
    ),
    # ... in a field value the module receives but never instantiates.
    Attack(
        "trust_from_class_entry_never_instantiated",
        "dense",
        _chain(
            set_field("precision", class_entry("attack_user_models", "Net")), _write_report_at_build
        ),
        ("write_report",),
    ),
    # ... a whole module entry, in a key the loader never decodes.
    Attack(
        "trust_from_module_entry_in_unread_key",
        "dense",
        _chain(
            on_module(
                lambda m, t: m.__setitem__(
                    "decoy", module_entry("attack_user_models", "Net", features=1)
                )
            ),
            _write_report_at_build,
        ),
        (("decoy", "write_report"),),
    ),
    # The script's own helper, "trusted" by a class entry naming `__main__` (Net is
    # attack_user_models's: the user class the file instantiates grants attack_user_models).
    Attack(
        "trust_main_from_decoy_class_entry",
        "net",
        _chain(
            on_module(lambda m, t: m.__setitem__("decoy", class_entry("__main__", "Net"))),
            lambda c, t: module_of(c)["fields"].__setitem__(
                "act", partial(fn("__main__", "script_report"), str(t))
            ),
        ),
        (("decoy", "script_report"),),
    ),
    Attack(
        "trust_main_from_module_class_named_in_main",
        "net",
        _chain(
            on_module(lambda m, t: m.__setitem__("class", ref("__main__", "Net"))),
            lambda c, t: module_of(c)["fields"].__setitem__(
                "act", partial(fn("__main__", "script_report"), str(t))
            ),
        ),
        ("__main__",),
    ),
    # The user's helper from attack_user_models (imported into the script too), with only a
    # class entry naming `__main__` to "trust" it; nn.Dense is the only module built.
    Attack(
        "trust_user_helper_via_main_class_entry",
        "dense",
        _chain(set_field("precision", class_entry("__main__", "Net")), _write_report_at_build),
        (("__main__", "write_report"),),
    ),
    Attack(
        "trust_user_helper_named_in_main",
        "dense",
        _chain(
            set_field("precision", class_entry("__main__", "Net")),
            call_at_build(fn("__main__", "write_report"), "TARGET", PWNED),
            lambda c, t: module_of(c)["fields"]["dot_general_cls"]["args"].__setitem__(0, str(t)),
        ),
        (("__main__", "write_report"),),
    ),
    # A library module (flax.linen.linear, nn.Dense's) grants nothing.
    Attack(
        "trust_from_library_module",
        "dense",
        call_at_build(fn("flax.linen.linear", "canonicalize_padding"), "SAME", 2),
        ("canonicalize_padding",),
    ),
]

FUNCTION_ATTACKS = [
    # Issue point 3: called by nn.Dense at build (dot_general_cls), arguments from the file.
    Attack(
        "fn_jax_numpy_set_printoptions",
        "dense",
        call_at_build(fn("jax.numpy", "set_printoptions"), precision=1, linewidth=21),
        ("set_printoptions",),
    ),
    Attack(
        "fn_numpy_set_printoptions",
        "dense",
        call_at_build(fn("numpy", "set_printoptions"), precision=1, linewidth=21),
        ("set_printoptions",),
    ),
    Attack(
        "fn_nnx_register_variable_name",
        "dense",
        call_at_build(
            fn("flax.nnx", "register_variable_name"),
            "params",
            class_entry("flax.nnx.variablelib", "BatchStat"),
            overwrite=True,
        ),
        ("register_variable_name",),
    ),
    Attack(
        "fn_nnx_register_variable_name_defining_module",
        "dense",
        call_at_build(
            fn("flax.nnx.variablelib", "register_variable_name"),
            "params",
            class_entry("flax.nnx.variablelib", "BatchStat"),
            overwrite=True,
        ),
        ("register_variable_name",),
    ),
    Attack(
        "fn_nnx_register_data_type",
        "dense",
        call_at_build(
            fn("flax.nnx", "register_data_type"), class_entry("attack_user_models", "Net")
        ),
        ("register_data_type",),
    ),
    Attack(
        "fn_flax_register_serialization_state",
        "dense",
        call_at_build(
            fn("flax.serialization", "register_serialization_state"),
            class_entry("attack_user_models", "Net"),
            fn("jax.nn", "relu"),
            fn("jax.nn", "relu"),
        ),
        ("register_serialization_state",),
    ),
    Attack(
        "fn_linen_enable_named_call",
        "dense",
        call_at_build(fn("flax.linen", "enable_named_call")),
        ("enable_named_call",),
    ),
    Attack(
        "fn_linen_module_enable_named_call",
        "dense",
        call_at_build(fn("flax.linen.module", "enable_named_call")),
        ("enable_named_call",),
    ),
    Attack(
        "fn_linen_disable_named_call",
        "dense",
        call_at_build(fn("flax.linen", "disable_named_call")),
        ("disable_named_call",),
    ),
    Attack(
        "fn_linen_set_logical_axis_rules",
        "dense",
        call_at_build(fn("flax.linen", "set_logical_axis_rules"), tup(tup("batch", "data"))),
        ("set_logical_axis_rules",),
    ),
    Attack(
        "fn_jax_config_update",
        "dense",
        call_at_build(fn("jax", "config.update"), "jax_enable_x64", True),
        ("update",),
    ),
    Attack(
        "fn_jax_src_config_update",
        "dense",
        call_at_build(fn("jax._src.config", "update"), "jax_enable_x64", True),
        ("update",),
    ),
    Attack(
        "fn_jax_debug_print",
        "dense",
        call_at_build(fn("jax.debug", "print"), PWNED + " debug.print {x}", x=1),
        ("print",),
    ),
    Attack(
        "fn_jax_debug_callback",
        "dense",
        call_at_build(fn("jax.debug", "callback"), fn("flax.nnx", "display"), PWNED + " callback"),
        ("callback",),
    ),
    Attack(
        "fn_nnx_display",
        "dense",
        call_at_build(fn("flax.nnx", "display"), PWNED + " nnx.display"),
        ("display",),
    ),
    Attack(
        "fn_linen_tabulate", "dense", call_at_build(fn("flax.linen", "tabulate")), ("tabulate",)
    ),
    Attack("fn_nnx_tabulate", "dense", call_at_build(fn("flax.nnx", "tabulate")), ("tabulate",)),
    # Array creation sized by its arguments (traced at build here, so refused by name).
    *[
        Attack(
            f"fn_jax_numpy_{name}",
            "dense",
            call_at_build(fn("jax.numpy", name), 600_000_000, *extra),
            (name,),
        )
        for name, extra in (
            ("zeros", ()),
            ("ones", ()),
            ("empty", ()),
            ("full", (7.0,)),
            ("arange", ()),
        )
    ],
    # The initializers modules' helpers that are not initializer factories.
    Attack(
        "factory_initializers_set_module",
        "net",
        set_field(
            "kernel_init", factory("jax._src.nn.initializers", "set_module", {"module": PWNED})
        ),
        ("set_module",),
    ),
]

BRIDGE_ATTACKS = [
    # Issue point 2: ToLinen calls nnx_class(*args, **kwargs) at build.
    Attack(
        "tolinen_nnx_class_set_printoptions",
        "tolinen",
        _tolinen(
            nnx_class=fn("jax.numpy", "set_printoptions"),
            kwargs=pydict(precision=1, linewidth=21),
            skip_rng=True,
        ),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_register_variable_name",
        "tolinen",
        _tolinen(
            nnx_class=fn("flax.nnx", "register_variable_name"),
            args=tup("params", class_entry("flax.nnx.variablelib", "BatchStat")),
            kwargs=pydict(overwrite=True),
            skip_rng=True,
        ),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_user_helper_decoy_class",
        "tolinen",
        _chain(
            _tolinen(
                nnx_class=fn("attack_user_models", "write_report"),
                args=lambda target: tup(target, PWNED),
                skip_rng=True,
            ),
            on_module(
                lambda m, t: m.__setitem__("decoy", class_entry("attack_user_models", "Mlp"))
            ),
        ),
        (("decoy", "nnx_class"),),
    ),
    # A user module really built by the loader (Net) trusts attack_user_models's functions,
    # but nnx_class must still be an NNX Module class.
    Attack(
        "tolinen_nnx_class_user_helper_with_user_module_built",
        "tolinen",
        _tolinen(
            nnx_class=fn("attack_user_models", "write_report"),
            args=lambda target: tup(target, module_entry("attack_user_models", "Net", features=1)),
            skip_rng=True,
        ),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_jnp_zeros",
        "tolinen",
        _tolinen(nnx_class=fn("jax.numpy", "zeros"), args=tup(50_000_000), skip_rng=True),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_is_a_linen_class",
        "tolinen",
        set_field("nnx_class", class_entry("attack_user_models", "Net")),
        ("nnx_class",),
    ),
    # metadata_fn is called with every variable at build.
    Attack(
        "tolinen_metadata_fn_register_variable_name",
        "tolinen",
        set_field(
            "metadata_fn",
            partial(fn("flax.nnx", "register_variable_name"), "params", overwrite=True),
        ),
        ("register_variable_name",),
    ),
    Attack(
        "tolinen_metadata_fn_display",
        "tolinen",
        set_field("metadata_fn", partial(fn("flax.nnx", "display"), PWNED + " metadata_fn")),
        ("display",),
    ),
]

# NNX calls a Variable's metadata hooks itself: on_create_value while the file is decoded
# (Variable.from_metadata), on_get_value/on_set_value at every read and write.
HOOK_ATTACKS = [
    Attack(
        "nnx_metadata_on_create_value_display",
        "mlp",
        _nnx_metadata(
            "linear1.kernel",
            "on_create_value",
            partial(fn("flax.nnx", "display"), PWNED + " on_create_value"),
        ),
        ("on_create_value",),
    ),
    Attack(
        "nnx_metadata_on_create_value_register",
        "mlp",
        _nnx_metadata(
            "linear1.kernel", "on_create_value", fn("flax.nnx", "register_variable_name")
        ),
        ("on_create_value",),
    ),
    Attack(
        "nnx_metadata_on_get_value_display",
        "mlp",
        _nnx_metadata(
            "linear1.kernel",
            "on_get_value",
            partial(fn("flax.nnx", "display"), PWNED + " on_get_value"),
        ),
        ("on_get_value",),
    ),
]

LINEN_API_METHODS = ("tabulate", "init", "apply", "bind", "sow", "__init__", "__setattr__")
NNX_API_METHODS = ("sow", "eval", "train", "set_attributes", "perturb", "__init__")
METHOD_ATTACKS = (
    [Attack(f"method_linen_{m}", "net_method", _method(m), (m,)) for m in LINEN_API_METHODS]
    + [
        Attack(
            "method_linen_bound_tabulate", "net_method", _method("tabulate", "bound"), ("tabulate",)
        )
    ]
    + [Attack(f"method_nnx_{m}", "mlp_method", _method(m), (m,)) for m in NNX_API_METHODS]
)

ENTRY_ATTACKS = [
    # Issue point 5: scalar and dtype entries accept numeric dtypes and JSON numbers only.
    Attack("scalar_object_dtype", "net", set_field("features", scalar("object", 4)), ("object",)),
    Attack("scalar_unicode_dtype", "net", set_field("features", scalar("U10", 4)), ("U10",)),
    Attack(
        "scalar_string_value", "net", set_field("features", scalar("int64", "4")), ("features",)
    ),
    Attack("dtype_object", "dense", set_field("param_dtype", dtype_entry("object")), ("object",)),
    Attack("dtype_unicode", "dense", set_field("param_dtype", dtype_entry("U10")), ("U10",)),
    Attack(
        "dtype_huge_void",
        "dense",
        set_field("param_dtype", dtype_entry("V1000000000")),
        ("V1000000000",),
    ),
]

MEMORY_ATTACKS = [
    # Issue point 5: each would take 2 GB or more; the peak may rise by MAX_RISE_MIB at most.
    # The brief's 1-D shape: fails while Keras builds the model (the Linear cannot run).
    Attack(
        "mem_nnx_variable_shape",
        "mlp",
        _nnx_attr("linear1.kernel", "shape", [400_000_000]),
        ("linear1", "kernel", "400000000"),
        child="memory",
        weights_error=True,
    ),
    # Widened consistently (the model builds): fails only on the stored weights.
    Attack(
        "mem_nnx_hidden_width",
        "mlp",
        _nnx_widen(75_000_000),
        ("linear1", "kernel", "(3, 4)", "(3, 75000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_linen_features",
        "net",
        set_field("features", 50_000_000),
        ("dense/kernel", "(3, 4)", "(3, 50000000)"),
        child="memory",
        load={"compile": False},
        weights_error=True,
    ),
    # The same with the file's compile config (plain SGD: Keras's optimizer adds no slots).
    Attack(
        "mem_linen_features_compiled",
        "net_compiled",
        set_field("features", 50_000_000),
        ("dense/kernel", "(3, 4)", "(3, 50000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_build_config_input_width",
        "net",
        _input_spec([None, 100_000_000]),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_jaxlayer_params_shape",
        "jaxlayer",
        _chain(_jax_param_shape("w", [3, 100_000_000]), _jax_param_shape("b", [100_000_000])),
        ("w", "(3, 2)", "(3, 100000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_tolinen_wide_nnx_linear",
        "tolinen",
        _tolinen(nnx_class=class_entry("flax.nnx.nn.linear", "Linear"), args=tup(3, 15_000_000)),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_tolinen_nnx_class_jnp_ones",
        "tolinen",
        _tolinen(nnx_class=fn("jax.numpy", "ones"), args=tup(600_000_000), skip_rng=True),
        ("nnx_class",),
        child="memory",
    ),
    Attack(
        "mem_factory_not_a_factory",
        "net",
        set_field(
            "kernel_init",
            factory(
                "jax._src.nn.initializers",
                "ones",
                {"key": 0, "shape": tup(600_000_000), "dtype": dtype_entry("float32")},
            ),
        ),
        ("ones",),
        child="memory",
    ),
    # Last: the largest single allocation (+3 GB on the first version; larger ones crashed).
    Attack(
        "mem_scalar_void",
        "net",
        set_field("features", scalar("V1", 200_000_000)),
        ("V1",),
        child="memory",
    ),
]

# An RNG key's shape is in no weights file (keys are re-made from the layer's seed at every
# call): a [50000000] key in a Dropout's stream is 400 MB (~1 GB to make) at every call.
RNG_KEY_ATTACK = Attack(
    "mem_nnx_rng_key_shape",
    "mlp_dropout",
    _nnx_attr("dropout.rngs.key", "shape", [50_000_000]),
    ("key", "50000000"),
    child="memory",
)

ERROR_ATTACKS = [
    # Issue point 6: no raw AttributeError, AssertionError, RecursionError or TypeError.
    Attack(
        "err_custom_config_without_from_config",
        "net",
        _custom_config,
        ("Net", ("custom_config", "from_config")),
    ),
    Attack(
        "err_parent_field",
        "net",
        set_field("parent", module_entry("attack_user_models", "Net", features=2)),
        ("parent",),
    ),
    # JSON nesting stays under json.loads's own limit (~1000 levels): the file reaches us.
    Attack("err_deep_list_nesting", "net", set_field("act", _nested_lists(900)), ("act",)),
    Attack("err_deep_tuple_nesting", "net", set_field("act", _nested_tuples(450)), ("act",)),
    Attack("err_deep_dict_nesting", "net", set_field("act", _nested_dicts(900)), ("act",)),
    Attack("err_field_wrong_type", "net", set_field("features", "abc"), ("features",)),
    Attack("err_field_not_callable", "net", set_field("act", 5), ("act",)),
    Attack("err_extra_positional", "tolinen", set_field("args", tup(3, 2, 4, 99)), ("args",)),
]
MAIN_CLASS_MISSING = Attack("err_main_class_missing", "main_class")
# What loading a legitimate file takes in a fresh fork (runtime start-up, the small weights):
# the memory attacks may add MAX_RISE_MIB to it, no more.
BASELINE = Attack("baseline_load_without_predict", "net", child="memory", predict=False)

ALL = [
    *CONTROLS,
    CUSTOM_OBJECTS_CONTROL,
    *CLASS_ATTACKS,
    *TRUST_ATTACKS,
    *FUNCTION_ATTACKS,
    *BRIDGE_ATTACKS,
    *HOOK_ATTACKS,
    *METHOD_ATTACKS,
    *ENTRY_ATTACKS,
    *ERROR_ATTACKS,
    MAIN_CLASS_MISSING,
    BASELINE,
    *MEMORY_ATTACKS,
    RNG_KEY_ATTACK,
]
BY_NAME = {a.name: a for a in ALL}
assert len(BY_NAME) == len(ALL), "attack names must be unique"


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


JAX_FLAGS = ("jax_enable_x64", "jax_debug_nans", "jax_disable_jit")


def _observe():
    """Process-wide settings a load must not change."""
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    return {
        "numpy print options": {k: repr(v) for k, v in np.get_printoptions().items()},
        "NNX variable-type registry": {
            k: repr(v) for k, v in variablelib.VariableTypeCache.items()
        },
        "NNX data-type registry": sorted(repr(t) for t in pytreelib.DATA_REGISTRY),
        "Flax state-dict registry": sorted(repr(t) for t in serialization._STATE_DICT_REGISTRY),
        "Linen named_call": repr(linen_module._use_named_call),
        "logical axis rules": repr(spmd._axis_rules.rules),
        "jax.config": {
            k: repr(getattr(jax.config, k)) for k in JAX_FLAGS
        },
    }


def _snapshot():
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    return (
        np.get_printoptions(),
        dict(variablelib.VariableTypeCache),
        set(pytreelib.DATA_REGISTRY),
        dict(serialization._STATE_DICT_REGISTRY),
        linen_module._use_named_call,
        spmd._axis_rules.rules,
        {k: getattr(jax.config, k) for k in JAX_FLAGS},
    )


def _restore(snapshot):
    """Undoes what an attack changed, so that the next file starts from the same state."""
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    printoptions, names, data, registry, named_call, rules, config = snapshot
    np.set_printoptions(**printoptions)
    variablelib.VariableTypeCache.clear()
    variablelib.VariableTypeCache.update(names)
    pytreelib.DATA_REGISTRY.clear()
    pytreelib.DATA_REGISTRY.update(data)
    serialization._STATE_DICT_REGISTRY.clear()
    serialization._STATE_DICT_REGISTRY.update(registry)
    linen_module._use_named_call = named_call
    spmd._axis_rules.rules = rules
    for k, v in config.items():
        if getattr(jax.config, k) != v:
            jax.config.update(k, v)


API_CALLS = []


def _monitor_flax_api():
    """Records calls of Flax API methods a file might name as the layer's `method`."""
    import functools

    import flax.linen as nn
    from flax import nnx

    for owner, names in (
        (nn.Module, ("tabulate", "bind", "sow")),
        (nnx.Module, ("sow", "perturb")),
    ):
        for name in names:
            original = getattr(owner, name)

            def wrapper(*args, __original=original, __name=f"{owner.__module__}.{name}", **kw):
                API_CALLS.append(__name)
                return __original(*args, **kw)

            setattr(owner, name, functools.wraps(original)(wrapper))


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kib():
    import resource

    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def _run_child(saved: Saved, attacks: list, directory, *, fork: bool) -> ChildRun:
    files, targets = [], {}
    for attack in attacks:
        target = directory / f"{attack.name}.written"
        targets[attack.name] = target
        path = directory / f"{attack.name}.keras"
        edit = attack.edit
        sm.rewrite_config(
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


@pytest.fixture(scope="module")
def runs(saved, tmp_path_factory) -> dict:
    """The two children, run side by side: "main" loads the controls and every attack but the
    memory ones, one after the other; "memory" loads a control, then the memory attacks, each
    in a fork of itself taken before it ran any JAX code, its peak memory measured from there."""
    main = [a for a in ALL if a.child == "main"]
    memory = [BY_NAME["control_linen_gelu_variance_scaling"]] + [
        a for a in ALL if a.child == "memory"
    ]  # the control, BASELINE, then MEMORY_ATTACKS
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            "main": pool.submit(
                _run_child, saved, main, tmp_path_factory.mktemp("attacks"), fork=False
            ),
            "memory": pool.submit(
                _run_child,
                saved,
                memory,
                tmp_path_factory.mktemp("memory"),
                fork=sys.platform.startswith("linux"),
            ),
        }
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def main_run(runs) -> ChildRun:
    return runs["main"]


@pytest.fixture(scope="module")
def memory_run(runs) -> ChildRun:
    return runs["memory"]


# ------------------------------------------------------------------------------ judging


def _no_side_effects(run: ChildRun, attack: Attack, result: dict) -> None:
    assert not run.targets[attack.name].exists(), (
        f"{attack.name}: loading wrote {run.targets[attack.name]}: "
        f"{run.targets[attack.name].read_text()[:200]!r}"
    )
    assert result["changed"] == [], f"{attack.name}: loading changed {result['changed']}"
    assert PWNED not in result["stdout"], f"{attack.name} printed: {result['stdout'][-500:]!r}"


def _refused(run: ChildRun, attack: Attack) -> dict:
    """The load failed with flaxlayer's SerializationError, naming what it should, and did
    nothing else."""
    result = run.result(attack.name)
    _no_side_effects(run, attack, result)
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
        assert any(_names_it(message, n) for n in alternatives), (
            f"{attack.name}: the message does not name {' or '.join(map(repr, alternatives))}: "
            f"{message[:1500]}"
        )
    return result


def _names_it(message: str, needle: str) -> bool:
    if needle.isidentifier():  # as a word: "act" is not found in "exact"
        return re.search(rf"\b{re.escape(needle)}\b", message) is not None
    return needle in message


def _names(attacks: list) -> list[str]:
    return [a.name for a in attacks]


# ---------------------------------------------------------------------------- point 7


@pytest.mark.parametrize("name", _names(CONTROLS))
def test_untampered_file_loads_and_predicts_equal(name, saved, main_run):
    """Point 7 (controls): each family's legitimate file loads in the same fresh-process setup
    (Linen with an activation and configured initializer, the user's own activation, a
    compiled model, methods by name incl. one inherited from a user base, NNX, ToLinen of the
    user's NNX class, a JaxLayer) and predicts what the saved model did."""
    attack = BY_NAME[name]
    result = main_run.result(name)
    assert result["loaded"], f"{name}: {result.get('error_type')}: {result.get('error', '')[:2000]}"
    np.testing.assert_allclose(
        np.asarray(result["prediction"]), np.asarray(saved.predictions[attack.base]), atol=1e-6
    )
    _no_side_effects(main_run, attack, result)
    assert result["peak_reset"] in (True, False)


def test_function_passed_in_custom_objects_loads(main_run):
    """Point 1 / rule 2(b): a function the script passes in custom_objects (Keras's explicit
    trust) is used, even though it lives in `__main__`."""
    result = main_run.result(CUSTOM_OBJECTS_CONTROL.name)
    assert result["loaded"], f"{result.get('error_type')}: {result.get('error', '')[:2000]}"
    assert result["act"] == "__main__.double"
    _no_side_effects(main_run, CUSTOM_OBJECTS_CONTROL, result)


def test_memory_child_control_loads(saved, memory_run):
    """Point 7: the memory child's warm-up control loads (so a memory test cannot pass because
    loading is broken there)."""
    result = memory_run.result("control_linen_gelu_variance_scaling")
    assert result["loaded"], f"{result.get('error_type')}: {result.get('error', '')[:2000]}"
    np.testing.assert_allclose(
        np.asarray(result["prediction"]), np.asarray(saved.predictions["net"]), atol=1e-6
    )


# ---------------------------------------------------------------------------- point 1


@pytest.mark.parametrize("name", _names(CLASS_ATTACKS))
def test_class_reference_must_name_the_defining_module_and_the_right_kind(name, main_run):
    """Point 1: a class resolves only from its own defining module (`__main__` does not stand
    for a class the script imported; flax.linen does not stand for flax.linen.linear) and only
    as a subclass of what its position needs (Linen module, NNX node, NNX Variable type)."""
    _refused(main_run, BY_NAME[name])


@pytest.mark.parametrize("name", _names(TRUST_ATTACKS))
def test_functions_trusted_only_through_instantiated_user_classes(name, main_run):
    """Point 1: a function is trusted through the defining module of a user Flax class the
    file actually builds. A class entry in an unread key, a class value never instantiated, a
    module entry the loader never builds, a class entry naming `__main__`, or a library class
    (nn.Dense) grants nothing: the user's `write_report` / the script's `script_report` never
    run (no file is written) and library helpers are refused."""
    _refused(main_run, BY_NAME[name])


# ---------------------------------------------------------------------------- point 3


@pytest.mark.parametrize("name", _names(FUNCTION_ATTACKS))
def test_function_outside_the_allow_list_is_refused_before_it_runs(name, main_run):
    """Point 3: functions that print, register, change configuration or global state, or trace
    (set_printoptions, Flax's register_*, named_call toggles, logical axis rules,
    jax.config.update, jax.debug.*, display, tabulate, the initializers modules' non-factory
    helpers) are refused; nn.Dense would call them at build with the file's arguments. Judged
    by the process-wide settings (unchanged) and stdout (nothing printed)."""
    _refused(main_run, BY_NAME[name])


# ---------------------------------------------------------------------------- point 2


@pytest.mark.parametrize("name", _names(BRIDGE_ATTACKS))
def test_bridge_calls_nothing_the_file_chose(name, main_run):
    """Point 2: ToLinen's nnx_class must be an NNX Module class passing point 1 (not a
    function, a registry, a numpy/jax callable, the user's helper, a Linen class) and its
    metadata_fn an allowed function; refused before anything is called."""
    _refused(main_run, BY_NAME[name])


@pytest.mark.parametrize("name", _names(HOOK_ATTACKS))
def test_nnx_variable_hooks_from_the_file_never_run(name, main_run):
    """Point 2 (beyond ToLinen): NNX calls a Variable's metadata hooks (on_create_value while
    the file is decoded, on_get_value at every read) with arguments of its choosing; a hook in
    a variable's metadata is a function position like any other (here: display, a registry)
    and is refused, naming the metadata key."""
    _refused(main_run, BY_NAME[name])


# ---------------------------------------------------------------------------- point 4


@pytest.mark.parametrize("name", _names(METHOD_ATTACKS))
def test_method_by_name_is_never_flax_api(name, main_run):
    """Point 4: `method` by name resolves only to a method the user's class (or a user base)
    defines; Module.tabulate/init/apply/bind/sow/__init__/__setattr__ and NNX's
    sow/eval/train/set_attributes/perturb/__init__ are refused and never run (no table
    printed, no Flax API call recorded)."""
    result = _refused(main_run, BY_NAME[name])
    assert result["api_calls"] == [], f"{name}: Flax API ran: {result['api_calls']}"
    assert "┃" not in result["stdout"] and "Tabulate" not in result["stdout"]


# ---------------------------------------------------------------------------- point 5


@pytest.mark.parametrize("name", _names(ENTRY_ATTACKS))
def test_scalar_and_dtype_entries_accept_numbers_only(name, main_run):
    """Point 5: scalar entries take bool/int/uint/float/complex dtypes and JSON-number values;
    dtype entries numeric names only (not object, U10, V1000000000)."""
    _refused(main_run, BY_NAME[name])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("name", _names(MEMORY_ATTACKS))
def test_loading_allocates_nothing_sized_by_the_config(name, memory_run):
    """Point 5: a ~1 KB config asking for 1-3 GB (an NNX variable of shape [400000000], a
    Linen features=50_000_000 with compile=False and with the file's compile config (plain
    SGD), a 100M-wide input in the build config, JaxLayer params of shape (3, 100M), ToLinen
    of a 15M-wide nnx.Linear or of jnp.ones(600M), a non-factory initializer `ones` called
    while decoding, a V1 scalar of 200 MB) raises the peak memory by less than MAX_RISE_MIB
    over loading the untampered file, and fails with SerializationError; where the weights
    disagree, the message names the path, the stored and the configured shape (Keras wraps
    errors raised while reading the weights in its own ValueError: accepted, with our text)."""
    _assert_memory_attack_refused(memory_run, name)


def _assert_memory_attack_refused(memory_run: ChildRun, name: str) -> None:
    attack = BY_NAME[name]
    result = memory_run.result(name)
    baseline = memory_run.result(BASELINE.name)
    assert baseline["loaded"], f"the baseline did not load: {baseline.get('error', '')[:2000]}"
    limit = baseline["peak_rise_mib"] + MAX_RISE_MIB
    outcome = (
        "it loaded"
        if result["loaded"]
        else f"{result.get('error_type')}: {result.get('error', '')[:300]}"
    )
    assert result["peak_rise_mib"] < limit, (
        f"{name}: peak memory rose by {result['peak_rise_mib']} MiB while loading (loading the "
        f"untampered file: {baseline['peak_rise_mib']} MiB; {outcome})"
    )
    _refused(memory_run, attack)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_rng_key_shape_from_the_config_allocates_nothing(memory_run):
    """Point 5, beyond the weights check: an NNX RngKey's shape is stored in the config only
    (the weights file has no keys), and the layer re-makes keys of that shape at every call.
    A [50000000] key must be refused (SerializationError naming the key and the shape), not
    allocated while loading or at the first call."""
    _assert_memory_attack_refused(memory_run, RNG_KEY_ATTACK.name)


# ---------------------------------------------------------------------------- point 6


def test_serialization_error_is_exported():
    """Point 6: flaxlayer exports SerializationError, a ValueError."""
    import flaxlayer

    assert issubclass(flaxlayer.SerializationError, ValueError)
    assert "SerializationError" in flaxlayer.__all__


@pytest.mark.parametrize("name", _names(ERROR_ATTACKS))
def test_odd_file_raises_serialization_error_naming_the_entry(name, main_run):
    """Point 6: a custom_config on a class without from_config (AttributeError today), a
    `parent` field (AssertionError), nesting deep enough to exhaust Python's stack
    (RecursionError), wrong-typed fields and an extra positional argument (TypeError) give a
    SerializationError naming the entry."""
    _refused(main_run, BY_NAME[name])


def test_saving_a_main_class_warns(saved):
    """Point 6: saving a model whose module class is defined in `__main__` warns that only a
    process whose `__main__` defines that class can load it."""
    messages = [m for _, m in saved.main_class_warnings if "__main__" in m]
    assert messages, f"no warning about __main__; got {saved.main_class_warnings}"
    assert any("LocalNet" in m for m in messages), messages


def test_loading_a_main_class_where_main_lacks_it_says_so(main_run):
    """Point 6: loading that file in a process whose `__main__` lacks the class says the class
    is missing and how to make it importable, not that the file was tampered with."""
    result = _refused(main_run, MAIN_CLASS_MISSING)
    message = result["error"]
    assert "__main__" in message and "LocalNet" in message, message
    assert "tamper" not in message.lower(), message
    assert "import" in message.lower(), message


# ------------------------------------------------------------------------- the children


def test_no_child_printed_an_attack_marker(main_run, memory_run):
    """Whatever got printed outside the load calls (C-level output, late callbacks)."""
    for run in (main_run, memory_run):
        printed = [line for line in run.stdout.splitlines() if not line.startswith(RESULT_MARKER)]
        assert not [line for line in printed if PWNED in line], printed[-20:]
        assert PWNED not in run.stderr, run.stderr[-2000:]
