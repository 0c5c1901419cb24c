"""Crafted `.keras` files against the config-class and enum rules, loaded (safe mode, the
default) in a fresh process, judged by what loading them does.

The child imports keras, flaxlayer and the user's model files (mt5_models, lm1b_models,
gemma_transformer) and config_attack_models, whose classes write a marker file when their
constructor, `from_dict` or enum member lookup runs. Each tampered file must fail with
`flaxlayer.SerializationError` naming what it gave, write no file, import no module, print
nothing and call nothing; each untampered file loads and predicts what the saved model did.

- Siblings: a class standing for the declared `T5Config` must be defined in transformers (a
  user's `PretrainedConfig` subclass is refused) and already imported (a transformers config
  module nobody imported stays unimported, even with `safe_mode=False`).
- Loose fields: `config: Any` accepts only a class defined beside a module class the file
  builds (`subprocess.Popen`, `os._wrap_close`, a dataclass elsewhere, a class of a module
  nobody imported are refused).
- Enums: a member is looked up by name only in a class the annotation names or one beside a
  module class the file builds (a foreign enum, a re-exported path, a class that is no Enum, a
  name that is no member, an enum whose metaclass has its own lookup are refused).
"""

import copy
import dataclasses
import json
from collections.abc import Callable

import keras
import numpy as np
import pytest
from flax import nnx

import gemma_transformer as gemma
import lm1b_models as lm1b
from flaxlayer import FlaxLayer
from helpers import only_layer_config, rewrite_config, run_python_reports

pytest.importorskip("transformers")
mt5 = pytest.importorskip("mt5_models", exc_type=ImportError)

TAG = "__flaxlayer__"
TOKENS = np.random.default_rng(0).integers(1, 32, size=(4, 5)).astype("int32")
#: Modules no file may get imported (each absent from the child before loading).
UNIMPORTED = ("this", "transformers.models.longt5.configuration_longt5")
#: What importing `this` prints.
ZEN = "Beautiful is better than ugly"


def _mt5():
    hf_model = mt5.tiny_mt5_encoder()
    return FlaxLayer(hf_model.module, method=mt5.mt5_encode, variables={"params": hf_model.params})


BASES: dict[str, Callable] = {
    "mt5": _mt5,
    "lm1b": lambda: FlaxLayer(lm1b.Wrapper(lm1b.TransformerConfig(num_layers=1))),
    "gemma": lambda: FlaxLayer(gemma.Transformer(gemma.TransformerConfig.tiny(), rngs=nnx.Rngs(0))),
}


def ref(module: str, qualname: str) -> dict:
    return {"module": module, "qualname": qualname}


def hf_config(module: dict) -> dict:
    return module["fields"]["config"]


def lm1b_config(module: dict) -> dict:
    return module["fields"]["config"]


def attention_type(module: dict) -> dict:
    """The first AttentionType member of the Gemma config's `attention_types` tuple."""
    return module["attributes"]["config"]["fields"]["attention_types"]["items"][0]


def set_class(where: Callable, module_name: str, qualname: str, **extra) -> Callable:
    def edit(module: dict, target: str) -> None:
        entry = where(module)
        entry["class"] = ref(module_name, qualname)
        entry.update({k: (v(target) if callable(v) else v) for k, v in extra.items()})

    return edit


def set_name(name) -> Callable:
    return lambda module, target: attention_type(module).__setitem__("name", name)


@dataclasses.dataclass
class Attack:
    name: str
    base: str
    edit: Callable | None = None
    needles: tuple = ()
    load: dict = dataclasses.field(default_factory=dict)


CONTROLS = [Attack(f"control_{base}", base) for base in BASES]
ATTACKS = [
    # Siblings (the field declares T5Config).
    Attack(
        "sibling_from_another_package",
        "mt5",
        set_class(hf_config, "config_attack_models", "LookalikeConfig"),
        ("LookalikeConfig", "sibling"),
    ),
    Attack(
        "sibling_not_imported",
        "mt5",
        set_class(hf_config, "transformers.models.longt5.configuration_longt5", "LongT5Config"),
        ("longt5", "not imported", "never imports"),
    ),
    Attack(
        "sibling_not_imported_even_outside_safe_mode",
        "mt5",
        set_class(hf_config, "transformers.models.longt5.configuration_longt5", "LongT5Config"),
        ("longt5", "even with safe_mode=False"),
        load={"safe_mode": False},
    ),
    # Loose fields (`config: Any`).
    Attack(
        "loose_popen",
        "lm1b",
        set_class(lm1b_config, "subprocess", "Popen", fields=lambda t: {"args": ["touch", t]}),
        ("Popen",),
    ),
    Attack(
        "loose_popen_from_dict",
        "lm1b",
        lambda module, target: (
            lm1b_config(module).update(
                {"class": ref("subprocess", "Popen"), "dict": {"args": ["touch", target]}}
            )
            or lm1b_config(module).pop("fields", None)
        ),
        ("Popen",),
    ),
    Attack(
        "loose_os_wrap_close",
        "lm1b",
        set_class(lm1b_config, "os", "_wrap_close", fields={}),
        ("_wrap_close",),
    ),
    Attack(
        "loose_dataclass_beside_no_built_module_class",
        "lm1b",
        set_class(lm1b_config, "config_attack_models", "PlantedConfig", fields={}),
        ("PlantedConfig", "module of a Flax module class"),
    ),
    Attack(
        "loose_class_of_a_module_never_imported",
        "lm1b",
        set_class(lm1b_config, "this", "Config", fields={}),
        ("this", "not imported"),
    ),
    Attack(
        "loose_class_of_a_module_never_imported_outside_safe_mode",
        "lm1b",
        set_class(lm1b_config, "this", "Config", fields={}),
        ("this", "even with safe_mode=False"),
        load={"safe_mode": False},
    ),
    # Enum members (the config declares `attention_types: Sequence[AttentionType]`).
    Attack("enum_name_not_a_member", "gemma", set_name("EVIL"), ("EVIL", "not a member")),
    Attack("enum_name_not_a_string", "gemma", set_name(["GLOBAL"]), ("not a member",)),
    Attack(
        "enum_class_not_an_enum",
        "gemma",
        set_class(attention_type, "subprocess", "Popen"),
        ("Popen", "not an Enum"),
    ),
    Attack(
        "enum_class_not_an_enum_beside_the_module",
        "gemma",
        set_class(attention_type, "gemma_modules", "Block"),
        ("Block",),
    ),
    Attack(
        "enum_class_path_into_another_module",
        "gemma",
        set_class(attention_type, "gemma_transformer", "modules.AttentionType"),
        ("modules.AttentionType",),
    ),
    Attack(
        "enum_class_from_another_module",
        "gemma",
        lambda module, target: attention_type(module).update(
            {"class": ref("signal", "Signals"), "name": "SIGKILL"}
        ),
        ("Signals", "module of a Flax module class"),
    ),
    Attack(
        "enum_with_its_own_member_lookup",
        "gemma",
        set_class(attention_type, "config_attack_models", "SpyEnum"),
        ("SpyEnum",),
    ),
    Attack(
        "enum_class_of_a_module_never_imported",
        "gemma",
        set_class(attention_type, "this", "AttentionType"),
        ("this", "not imported"),
    ),
]
BY_NAME = {a.name: a for a in [*CONTROLS, *ATTACKS]}

CHILD = """
import contextlib, io, os, sys

import keras
import numpy as np

import config_attack_models, gemma_transformer, lm1b_models, mt5_models
from flaxlayer import SerializationError

plan = json.loads(open(os.environ["CONFIG_ATTACK_PLAN"]).read())
x = np.asarray(plan["x"], "int32")
report({"unimported_before": [m for m in plan["unimported"] if m in sys.modules]})
for entry in plan["files"]:
    os.environ[config_attack_models.MARKER_ENV] = entry["target"]
    result = {"name": entry["name"]}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), mt5_models.jax_clip_keywords():
            model = keras.saving.load_model(entry["path"], **entry["load"])
            result["prediction"] = np.asarray(model.predict(x, verbose=0)).tolist()
        result["loaded"] = True
    except Exception as e:
        result["loaded"] = False
        result["serialization_error"] = isinstance(e, SerializationError)
        result["error"] = f"{type(e).__module__}.{type(e).__name__}: {e}"[:4000]
    result["stdout"] = out.getvalue()[-2000:]
    result["imported"] = [m for m in plan["unimported"] if m in sys.modules]
    report(result)
    keras.backend.clear_session(free_memory=False)
""".replace("json.loads", "_json.loads")


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    """Every base saved once, every file loaded by one fresh child process of this backend."""
    folder = tmp_path_factory.mktemp("config_attacks")
    paths, predictions = {}, {}
    with mt5.jax_clip_keywords():
        for name, make in BASES.items():
            keras.backend.clear_session()
            model = keras.Sequential([keras.Input((5,), dtype="int32"), make()])
            predictions[name] = model.predict(TOKENS, verbose=0)
            paths[name] = folder / f"{name}.keras"
            model.save(paths[name])
    files, targets = [], {}
    for attack in [*CONTROLS, *ATTACKS]:
        targets[attack.name] = target = folder / f"{attack.name}.written"
        path = folder / f"{attack.name}.keras"

        def edit(config, attack=attack, target=target):
            if attack.edit is not None:
                attack.edit(only_layer_config(config)["module"], str(target))

        rewrite_config(paths[attack.base], path, edit)
        files.append(
            {"name": attack.name, "path": str(path), "target": str(target), "load": attack.load}
        )
    plan = folder / "plan.json"
    plan.write_text(
        json.dumps({"x": TOKENS.tolist(), "files": files, "unimported": list(UNIMPORTED)})
    )
    reports, done = run_python_reports(CHILD, env={"CONFIG_ATTACK_PLAN": str(plan)}, timeout=900)
    results = {r["name"]: r for r in reports if "name" in r}
    assert reports and "unimported_before" in reports[0], done.stderr[-4000:]
    assert reports[0]["unimported_before"] == [], "the child imported a watched module itself"
    return results, predictions, targets, done


def _result(child, name: str) -> dict:
    results, _, targets, done = child
    assert name in results, f"{name}: the child never reported.\n{done.stderr[-4000:]}"
    result = results[name]
    assert not targets[name].exists(), f"{name}: loading wrote {targets[name].read_text()!r}"
    assert result["imported"] == [], f"{name}: loading imported {result['imported']}"
    assert ZEN not in result["stdout"] and result["stdout"] == "", result["stdout"]
    return result


@pytest.mark.parametrize("name", [a.name for a in CONTROLS])
def test_untampered_file_loads_in_a_fresh_process_and_predicts_equal(name, child):
    result = _result(child, name)
    assert result["loaded"], result.get("error")
    expected = child[1][BY_NAME[name].base]
    np.testing.assert_allclose(np.asarray(result["prediction"]), expected, atol=1e-5)


@pytest.mark.parametrize("name", [a.name for a in ATTACKS])
def test_crafted_config_or_enum_class_is_refused_with_no_side_effect(name, child):
    result = _result(child, name)
    assert not result["loaded"], f"{name}: the tampered file loaded"
    assert result["serialization_error"], result["error"]
    for needle in BY_NAME[name].needles:
        assert needle in result["error"], f"{name}: {needle!r} not in {result['error']}"


def test_the_edits_change_the_files():
    """Each attack's edit changes its base's config (no attack passes by editing nothing)."""
    sample = {
        "mt5": {"fields": {"config": {TAG: "config", "class": ref("m", "C"), "dict": {}}}},
        "lm1b": {"fields": {"config": {TAG: "config", "class": ref("m", "C"), "fields": {}}}},
        "gemma": {
            "attributes": {
                "config": {
                    "fields": {
                        "attention_types": {
                            "items": [{TAG: "enum", "class": ref("m", "E"), "name": "A"}]
                        }
                    }
                }
            }
        },
    }
    for attack in ATTACKS:
        module = copy.deepcopy(sample[attack.base])
        attack.edit(module, "target")
        assert module != sample[attack.base], attack.name
