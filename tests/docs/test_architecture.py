"""docs/architecture.md tells the truth about the code: every module of the package is in its
table and every module the table names exists, each part it lists has the type and owner it
says, its loading phases are the code's, and every name its "How to add" steps point to exists
where it says."""

import importlib
import pathlib
import re

import keras
import pytest

import flaxlayer
from flaxlayer._lifecycle import Phase

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "src" / "flaxlayer"

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="reads source and docs: once, on the JAX backend"
)


def _section(title: str) -> str:
    start = PAGE.index(f"## {title}")
    end = PAGE.find("\n## ", start + 1)
    return PAGE[start : end if end != -1 else None]


def _table_rows(title: str) -> list[list[str]]:
    rows = [line for line in _section(title).splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def _package_modules() -> set[str]:
    names = {p.name for p in PACKAGE.glob("_*.py") if p.name != "__init__.py"}
    names |= {f"{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and p.name.startswith("_")}
    return {n for n in names if n != "__pycache__/"}


def test_the_modules_table_names_every_module_of_the_package_and_no_other():
    named = {
        name
        for row in _table_rows("The modules")
        for name in re.findall(r"`(_[\w/]+(?:\.py|/))`", row[0])
    }
    assert named == _package_modules()


@pytest.mark.parametrize("row", _table_rows("The parts of a layer"), ids=lambda r: r[0])
def test_each_part_has_the_type_and_owner_the_page_says(row):
    (type_name,) = re.findall(r"`(\w+)`", row[1])[:1]
    (owner,) = re.findall(r"`(_\w+)\.py`", row[2])
    module = importlib.import_module(f"flaxlayer.{owner}")
    assert isinstance(getattr(module, type_name), type)


def test_the_phases_on_the_page_are_the_codes():
    row = next(r for r in _table_rows("The parts of a layer") if r[0] == "lifecycle")
    named = set(re.findall(r"`([A-Z]+)`", row[3])) - {"TRANSITIONS"}
    assert named == {p.name for p in Phase}


HOW_TO_ADD = {
    "_flax_layer": ["MODULE_ADAPTERS"],
    "_adapter": ["ModuleAdapter"],
    "_saving.codec": ["KindCodec"],
    "_bridges": ["compile_for_backend", "initial_value", "jax_copy", "placeholder_for_loading"],
    "_transforms": ["Transform", "TRANSFORMS", "module_params"],
    "_distribution": ["derived_layout"],
    "_finetune": ["add_extra"],
    "_finetune_config": ["replay_finetune"],
    "_finetune_methods": ["FineTuningMethods"],
    "_store": ["LayerVariables", "Extra"],
}


@pytest.mark.parametrize("module", sorted(HOW_TO_ADD))
def test_the_names_the_how_to_add_steps_use_exist_where_the_page_says(module):
    text = _section("How to add ...")
    mod = importlib.import_module(f"flaxlayer.{module}")
    for name in HOW_TO_ADD[module]:
        assert re.search(rf"`[\w./]*\b{name}\b", text), f"{name} is not in How to add"
        assert hasattr(mod, name), f"flaxlayer.{module}.{name}"


def test_flaxlayer_is_a_jaxlayer_built_through_one_construction_path():
    assert issubclass(flaxlayer.FlaxLayer, flaxlayer.JaxLayer)
    assert "_construct" not in vars(flaxlayer.FlaxLayer)
    assert "get_config" not in vars(flaxlayer.FlaxLayer)
    assert "from_config" not in vars(flaxlayer.FlaxLayer)
