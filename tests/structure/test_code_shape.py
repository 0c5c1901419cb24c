"""The package's code shape, checked on its source with `ast`: short functions and classes, few
`type: ignore` comments, and every private Keras, JAX and Flax name kept in `_compat.py`.

The private-name rule, in one sentence: outside `_compat.py`, flaxlayer imports no private
Keras, JAX or Flax module and names no private attribute of Keras, JAX or Flax objects (a
`_name` that their layers, models, variables, modules or arrays have, or that Keras's source
assigns to `self`; as `x._name` or as a string), except, on `self` or `cls`, an attribute that
flaxlayer's own classes define, provided that in a class that is a Keras layer it is not one
of Keras layers' private attributes.

Each failure names file:line. Ruff's C901 (complexity at most 10) runs in `make lint`; the
last test checks that it stays configured.
"""

import ast
import functools
import io
import re
import tokenize
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "flaxlayer"
MODULES = sorted(SRC.rglob("*.py"))
IDS = [str(p.relative_to(SRC)) for p in MODULES]
COMPAT = SRC / "_compat.py"

MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 300
MAX_TYPE_IGNORES = 9

# Top-level packages whose private modules and attributes belong in `_compat.py`.
FRAMEWORKS = ("keras", "jax", "jaxlib", "flax")


@functools.cache
def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(_source(path), filename=str(path))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def _lines(node: ast.stmt) -> int:
    """From the `def` or `class` line to the last line, docstring included."""
    return (node.end_lineno or node.lineno) - node.lineno + 1


# ------------------------------------------------------------------------------------ size


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_functions_are_at_most_50_lines(path):
    long = [
        f"{_where(path, node.lineno)}: {node.name} is {_lines(node)} lines"
        for node in ast.walk(_tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_classes_are_at_most_300_lines(path):
    long = [
        f"{_where(path, node.lineno)}: class {node.name} is {_lines(node)} lines"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ClassDef) and _lines(node) > MAX_CLASS_LINES
    ]
    assert not long, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(long)


def _type_ignores(path: Path) -> Iterator[int]:
    """The lines of `path` with a `type: ignore` comment (comments only, not strings)."""
    for token in tokenize.generate_tokens(io.StringIO(_source(path)).readline):
        if token.type == tokenize.COMMENT and re.search(r"type:\s*ignore", token.string):
            yield token.start[0]


def test_at_most_9_type_ignores_in_the_package():
    found = [_where(path, line) for path in MODULES for line in _type_ignores(path)]
    assert len(found) <= MAX_TYPE_IGNORES, (
        f"{len(found)} `type: ignore` comments (at most {MAX_TYPE_IGNORES}):\n" + "\n".join(found)
    )


# --------------------------------------------------------------------------- private names


def _private(names) -> set[str]:
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _held(*objects) -> set[str]:
    """The private names the objects (classes or instances) have: `dir`, and `vars` of each."""
    names: set[str] = set()
    for obj in objects:
        names |= _private(dir(obj))
        if hasattr(obj, "__dict__"):
            names |= _private(vars(obj))
    return names


@functools.cache
def keras_layer_private_names() -> frozenset[str]:
    """The private attributes of Keras layers and models: classes and a built Dense."""
    import keras

    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    return frozenset(_held(keras.layers.Layer, keras.Model, dense))


@functools.cache
def keras_self_assigned_names() -> frozenset[str]:
    """The private attributes Keras's own source assigns to `self` (a distribution's
    `_layout_map`, an optimizer's, ...: objects not built here)."""
    import keras

    names: set[str] = set()
    for path in (Path(keras.__file__).parent / "src").rglob("*.py"):
        if path.name.endswith("_test.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
    return frozenset(_private(names))


@functools.cache
def framework_private_names() -> frozenset[str]:
    """Every private attribute name read from Keras, JAX and Flax objects, and assigned by
    Keras's source."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np
    from flax import linen, nnx

    key = jax.random.key(0)
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    return (
        keras_layer_private_names()
        | keras_self_assigned_names()
        | frozenset(
            _held(keras.Variable, keras.Variable(np.zeros(2, "float32")))
            | _held(jnp.zeros(2), key, key.dtype, jax.ShapeDtypeStruct((2,), jnp.float32))
            | _held(nnx.Module, nnx.Variable, linear, linear.kernel, nnx.Rngs(0), linen.Module)
        )
    )


def _base_names(node: ast.ClassDef) -> list[str]:
    return [ast.unparse(base) for base in node.bases]


@functools.cache
def _own_classes() -> dict[str, tuple[list[str], set[str]]]:
    """flaxlayer's classes by name: their bases, and the private attributes each defines (in
    its body, or assigned to `self.`/`cls.` in its methods)."""
    classes: dict[str, tuple[list[str], set[str]]] = {}
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (_base_names(node), _private(_defined_by(node)))
    return classes


def _defined_by(node: ast.ClassDef) -> Iterator[str]:
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield item.name
        targets = item.targets if isinstance(item, ast.Assign) else []
        if isinstance(item, (ast.AnnAssign, ast.AugAssign)):
            targets = [item.target]
        yield from (t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.ctx, ast.Store)
            and isinstance(sub.value, ast.Name)
            and sub.value.id in ("self", "cls")
        ):
            yield sub.attr


@functools.cache
def keras_layer_classes() -> frozenset[str]:
    """flaxlayer's classes that are Keras layers: a Keras base, a flaxlayer base that is one,
    or a mixin of one (its `self` is the layer)."""
    classes = _own_classes()
    found = {
        name
        for name, (bases, _) in classes.items()
        if any(base.split(".")[0] == "keras" for base in bases)
    }
    while True:
        more = {n for n, (bases, _) in classes.items() if found & {b.split(".")[-1] for b in bases}}
        more |= {b for n in found for b in classes[n][0] if b in classes}
        if more <= found:
            return frozenset(found)
        found |= more


@functools.cache
def own_private_names() -> frozenset[str]:
    return frozenset(name for _, defined in _own_classes().values() for name in defined)


def _exempt(name: str, on_self: bool, cls: str | None) -> bool:
    """Whether `name` used on `self`/`cls` in class `cls` is flaxlayer's own attribute."""
    if not on_self or name not in own_private_names():
        return False
    return cls not in keras_layer_classes() or name not in keras_layer_private_names()


# Calls that take an attribute name as their second argument.
_BY_NAME = {
    "getattr",
    "setattr",
    "hasattr",
    "delattr",
    "object.__setattr__",
    "object.__getattribute__",
    "object.__delattr__",
}


def _is_private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in FRAMEWORKS and (
        parts[:2] == ["keras", "src"] or any(p.startswith("_") for p in parts[1:])
    )


class _PrivateUses(ast.NodeVisitor):
    """Collects (line, what) for every private framework name a module uses."""

    def __init__(self):
        self.found: list[tuple[int, str]] = []
        self.classes: list[str | None] = [None]
        self.by_name: set[int] = set()  # the name arguments of getattr-like calls

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node.name)
        self.generic_visit(node)
        self.classes.pop()

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_private_module(alias.name):
                self.found.append((node.lineno, f"imports {alias.name}"))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] in FRAMEWORKS:
            for alias in node.names:
                if _is_private_module(f"{module}.{alias.name}"):
                    self.found.append((node.lineno, f"imports {alias.name} from {module}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if node.attr in framework_private_names() and not _exempt(
            node.attr, on_self, self.classes[-1]
        ):
            self.found.append((node.lineno, f"uses {ast.unparse(node)}"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        # getattr(x, "_name"), object.__setattr__(x, "_name", value), ...: as x._name.
        name = ast.unparse(node.func)
        if name in _BY_NAME and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            on_self = isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")
            self._check_string(node.args[1], on_self)
            self.by_name.add(id(node.args[1]))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # Any other string naming a private attribute: a key of vars(x), a setattr loop, ...
        if id(node) not in self.by_name:
            self._check_string(node, on_self=False)

    def _check_string(self, node: ast.Constant, on_self: bool) -> None:
        if (
            isinstance(node.value, str)
            and node.value in framework_private_names()
            and not _exempt(node.value, on_self, self.classes[-1])
        ):
            self.found.append((node.lineno, f"names {node.value!r}"))


@pytest.mark.parametrize("path", [p for p in MODULES if p != COMPAT], ids=lambda p: p.name)
def test_private_framework_names_only_in_compat(path):
    """(The module docstring states the rule.)"""
    visitor = _PrivateUses()
    visitor.visit(_tree(path))
    found = [f"{_where(path, line)}: {what}" for line, what in sorted(visitor.found)]
    assert not found, (
        "private Keras, JAX or Flax names outside _compat.py (move each into a small "
        "documented function there):\n" + "\n".join(found)
    )


def test_the_rule_sees_what_it_should():
    """The scan flags the names the rule is about, and not flaxlayer's own attributes."""
    assert {"_tracker", "_called", "_trainable_variables"} <= keras_layer_private_names()
    assert {"_value", "_impl", "_raw_value", "_pytree__state", "_layout_map"} <= (
        framework_private_names()
    )
    code = (
        "from keras.src import ops\n"
        "import jax._src.core\n"
        "from flax.nnx import _private\n"
        "class Own:\n"
        "    def f(self, layer, variable):\n"
        "        self._arrays = variable._value\n"
        "        return layer._tracker, self._arrays, getattr(layer, '_called')\n"
        "    def g(self):\n"
        "        return getattr(self, '_arrays'), vars(self)['_pytree__state']\n"
    )
    visitor = _PrivateUses()
    visitor.visit(ast.parse(code))
    assert [line for line, _ in visitor.found] == [1, 2, 3, 6, 7, 7, 9]


def test_complexity_and_typing_rules_are_configured():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lint = config["tool"]["ruff"]["lint"]
    assert "C901" in lint["select"]
    assert lint["mccabe"]["max-complexity"] == 10
    assert config["tool"]["mypy"]["check_untyped_defs"] is True
