"""What a `.keras` file may name, each name checked against one rule.

- A **class** is resolved only from a module the process has already imported, by reading that
  module's own dictionary, and only if the class found reports exactly that module and name
  (`__module__`, `__qualname__`) and is a subclass of what its position needs.
- A **function** (`resolve_function`) is resolved only if it is one of the objects listed below
  (`NUMERICAL_FUNCTIONS`), registered with Keras or passed in `custom_objects`, or a top-level
  function of the module that defines a user class the file instantiates.
- An **initializer factory** is called only if it is one of `INITIALIZER_FACTORIES`.
- A **config class** is the class the field declares or a subclass; or its *sibling*
  (`are_siblings`): both defined in one top-level package, the value's class a subclass of
  every direct base of the declared class, each such base (never `object`) defined in that
  package too; or, in a field declared loosely (`object`, `Any`, no type), a class defined in
  the Python module of a Flax module class of yours that the file builds. Config and enum
  classes are read only from modules already imported, even with `safe_mode=False`.
- An **enum member** is looked up by name among its class's members (`enum_member`), the class
  named by the field's annotation (anywhere in it: `E | None`, `tuple[E, ...]`,
  `Sequence[E]`) or defined in the Python module of a Flax module class of yours the file
  builds; nothing the file names is called.
- A **dtype** is accepted only by the name of a numeric or bool type.

Nothing here imports a module a file names, runs an attribute hook, or calls what it finds.
"""

import enum
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import keras
import numpy as np

# Elementwise, activation and reduction functions a module field may hold, and the layer
# internals Flax's own modules keep as attributes. Never anything that creates arrays of a
# size given by its arguments, prints, registers, configures or touches files.
# fmt: off
_ELEMENTWISE = (
    "abs", "absolute", "arccos", "arccosh", "arcsin", "arcsinh", "arctan", "arctan2", "arctanh",
    "cbrt", "ceil", "clip", "cos", "cosh", "deg2rad", "exp", "exp2", "expm1", "fabs", "floor",
    "fmax", "fmin", "log", "log10", "log1p", "log2", "logaddexp", "maximum", "minimum",
    "negative", "positive", "rad2deg", "reciprocal", "rint", "round", "sign", "sin", "sinc",
    "sinh", "sqrt", "square", "tan", "tanh", "trunc", "add", "subtract", "multiply", "divide",
    "true_divide", "power", "float_power", "nan_to_num",
)
_REDUCTIONS = (
    "sum", "mean", "max", "min", "amax", "amin", "prod", "std", "var", "median", "all", "any",
    "argmax", "argmin",
)
_ACTIVATIONS = (
    "celu", "elu", "gelu", "glu", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
    "leaky_relu", "log_sigmoid", "log_softmax", "logsumexp", "mish", "relu", "relu6", "selu",
    "sigmoid", "silu", "soft_sign", "softmax", "softplus", "sparse_plus", "sparse_sigmoid",
    "squareplus", "standardize", "swish", "identity", "tanh",
)
# fmt: on
NUMERICAL_FUNCTIONS: tuple[str, ...] = (  # the first name of an object is the one saved
    *(f"jax.numpy.{n}" for n in (*_ELEMENTWISE, *_REDUCTIONS)),
    *(f"jax.nn.{n}" for n in _ACTIVATIONS),
    *(f"flax.linen.{n}" for n in _ACTIVATIONS),
    *(f"flax.nnx.{n}" for n in _ACTIVATIONS),
    *(f"numpy.{n}" for n in (*_ELEMENTWISE, *_REDUCTIONS)),
    "jax.numpy.linalg.norm",
    "jax.numpy.einsum",
    *(f"jax.lax.{n}" for n in ["rsqrt", "erf", "erfc", "erf_inv", "logistic", "stop_gradient"]),
    *(f"jax.scipy.special.{n}" for n in ["erf", "erfc", "erfinv", "expit", "logit", "logsumexp"]),
    # What Flax's modules hold as attributes (nnx.Linear.dot_general, nnx.Conv, attention).
    "jax.lax.dot_general",
    "jax.lax.conv_general_dilated",
    "jax.lax.conv_transpose",
    "flax.linen.dot_product_attention",
    "flax.linen.dtypes.promote_dtype",
    "flax.nnx.dot_product_attention",
    "flax.nnx.nn.dtypes.promote_dtype",
    # Initializers themselves: called by Flax as init(key, shape, dtype) for a variable.
    "jax.nn.initializers.zeros",
    "jax.nn.initializers.ones",
)
#: Initializer factories (`normal(0.02)`, `variance_scaling(...)`): the only calls a file makes.
# fmt: off
_FACTORY_NAMES = (
    "constant", "delta_orthogonal", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
    "kaiming_normal", "kaiming_uniform", "lecun_normal", "lecun_uniform", "normal", "orthogonal",
    "truncated_normal", "uniform", "variance_scaling", "xavier_normal", "xavier_uniform",
)
# fmt: on
INITIALIZER_FACTORIES: tuple[str, ...] = (
    *(f"jax.nn.initializers.{n}" for n in _FACTORY_NAMES),
    "flax.linen.initializers.zeros_init",
    "flax.linen.initializers.ones_init",
)
#: Initializers may be set whole but not wrapped in functools.partial (a bound `shape` would
#: size an array by the file).
_INITIALIZER_NAMES = ("jax.nn.initializers.zeros", "jax.nn.initializers.ones")

#: Packages whose module classes grant no trust to the functions of their modules: their
#: modules hold registries, printers and documentation helpers, not a model's functions.
# fmt: off
LIBRARY_PACKAGES = frozenset(
    (
        "flax", "jax", "jaxlib", "numpy", "keras", "flaxlayer", "transformers", "optax", "haiku",
        "tensorflow", "torch", "orbax", "scipy", "ml_dtypes", "chex", "einops",
    )
)
# fmt: on

_DTYPE_NAME = re.compile(
    r"^(bool|u?int(4|8|16|32|64)|float(16|32|64)|bfloat16|complex(64|128)|"
    r"float8_\w+|float4_\w+)$"
)


class Refused(Exception):
    """A name a file gave that the rules refuse; `reason` says which rule and the fix."""


def lookup(module_name: str, qualname: str) -> Any:
    """Reads `qualname` from an already-imported module's own dictionary, then class ones.

    Runs no attribute hook, and never passes through a second module: "os.system" read from a
    module that imported `os` is refused.
    """
    if not (isinstance(module_name, str) and isinstance(qualname, str)):
        return None  # a name from a file that is no string names nothing
    module = sys.modules.get(module_name)
    if not isinstance(module, types.ModuleType) or not qualname:
        return None
    first, *rest = qualname.split(".")
    obj = vars(module).get(first)
    for part in rest:
        if not isinstance(obj, type) or part.startswith("<"):
            return None
        obj = next((vars(c)[part] for c in obj.__mro__ if part in vars(c)), None)
    if isinstance(obj, types.ModuleType) or first.startswith("<"):
        return None
    return obj


def is_library_module(module_name: str) -> bool:
    top = module_name.partition(".")[0]
    return top in LIBRARY_PACKAGES or top in sys.stdlib_module_names


def _resolve_public(dotted: str) -> Any:
    """An allow-list entry, read through already-imported public modules (our names only)."""
    module_name, _, name = dotted.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None and module_name.startswith(("flax.", "jax.")):
        try:  # submodules of packages flaxlayer itself imports; never a name from a file
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    return getattr(module, name, None) if module is not None else None


class _Index:
    """Identity sets of the allow-listed objects, with their public names."""

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        self._by_id: dict[int, tuple[Any, str]] | None = None

    def _table(self) -> dict[int, tuple[Any, str]]:
        if self._by_id is None:
            table: dict[int, tuple[Any, str]] = {}
            for dotted in self.names:
                obj = _resolve_public(dotted)
                if callable(obj) and not isinstance(obj, type):
                    table.setdefault(id(obj), (obj, dotted))
            self._by_id = table
        return self._by_id

    def name_of(self, obj: Any) -> str | None:
        hit = self._table().get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None


_NUMERICAL = _Index(NUMERICAL_FUNCTIONS)
_FACTORIES = _Index(INITIALIZER_FACTORIES)
_INITIALIZERS = _Index(_INITIALIZER_NAMES)


def numerical_name(fn: Any) -> str | None:
    """The public name of an allow-listed numerical function, else None."""
    return _NUMERICAL.name_of(fn)


def factory_name(fn: Any) -> str | None:
    return _FACTORIES.name_of(fn)


def is_initializer(fn: Any) -> bool:
    return _INITIALIZERS.name_of(fn) is not None


def split_name(dotted: str) -> tuple[str, str]:
    module_name, _, name = dotted.rpartition(".")
    return module_name, name


def resolve_class(
    module_name: str, qualname: str, *, safe: bool, what: str = "a Flax module class"
) -> type:
    """The class a file names, under the class rule; raises Refused (`what`: the kind of class
    the position needs, for the message)."""
    if module_name not in sys.modules:
        if module_name == "__main__" or safe:
            raise Refused(
                f"module {module_name!r} is not imported, and safe loading never imports what "
                f"a file names. Import it first (`import {module_name}`), or pass "
                "safe_mode=False to keras.saving.load_model if you trust the file."
            )
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise Refused(f"importing {module_name!r} failed: {e}.") from e
    cls = lookup(module_name, qualname)
    if cls is None and module_name == "__main__":
        raise Refused(
            f"the class {qualname!r} is missing: the file was saved by a script that defined "
            f"it in its own `__main__`, and this process's `__main__` defines no {qualname}. "
            f"Move the class into a module both scripts import (e.g. `models.py`), import it "
            "before loading, and save the model again."
        )
    if not isinstance(cls, type):
        raise Refused(
            f"{module_name}.{qualname} is not {what} (not a class defined there); "
            "the file may have been tampered with."
        )
    if cls.__module__ != module_name or cls.__qualname__ != qualname:
        raise Refused(
            f"{module_name}.{qualname} is {cls.__module__}.{cls.__qualname__}: a file may "
            "name a class only by the module that defines it."
        )
    return cls


def resolve_loaded_class(module_name: str, qualname: str, what: str) -> type:
    """A config or enum class (`what`), read only from a module already imported: never
    imported, whatever the safe mode; raises Refused."""
    if module_name not in sys.modules:
        raise Refused(
            f"module {module_name!r} is not imported, and a loader never imports the module of "
            f"{what} a file names, even with safe_mode=False. Import it first "
            f"(`import {module_name}`)."
        )
    return resolve_class(module_name, qualname, safe=True, what=what)


def _package(cls: type) -> str:
    return cls.__module__.partition(".")[0]


def are_siblings(cls: type, declared: type) -> bool:
    """Whether `cls` may stand for `declared` as its sibling: both are defined in one top-level
    package, and `cls` subclasses every direct base of `declared`, each of them (never
    `object`) defined in that package too (Hugging Face's `MT5Config` for `T5Config`, both
    children of `transformers.PretrainedConfig`)."""
    package = _package(declared)
    return _package(cls) == package and all(
        base is not object and _package(base) == package and issubclass(cls, base)
        for base in declared.__bases__
    )


def enum_member(cls: Any, name: Any) -> enum.Enum:
    """The member named `name` of the Enum class `cls`, read from its members with the standard
    enum lookup (never a method of `cls` or of its metaclass); raises Refused."""
    if not (isinstance(cls, enum.EnumType) and issubclass(cls, enum.Enum)):
        raise Refused(
            f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!r} is not an "
            "Enum class; the file may have been tampered with."
        )
    try:
        member = enum.EnumType.__getitem__(cls, name) if isinstance(name, str) else None
    except KeyError:
        member = None
    if type(member) is not cls:
        members = ", ".join(m.name for m in enum.EnumType.__iter__(cls))
        raise Refused(
            f"{name!r} is not a member of {cls.__module__}.{cls.__qualname__} (its members: "
            f"{members}); the file may have been tampered with."
        )
    return member


def dtype_from_name(name: Any) -> np.dtype:
    """A numeric or bool dtype from its name; raises Refused for anything else."""
    if not isinstance(name, str) or not _DTYPE_NAME.match(name):
        raise Refused(f"{name!r} is not the name of a numeric or bool dtype.")
    import jax.numpy as jnp

    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise Refused(f"{name!r} is not a dtype this JAX knows.") from e


def _is_function(obj: Any) -> bool:
    return callable(obj) and not isinstance(obj, type)


def resolve_function(
    entry: Mapping[str, str], *, safe: bool, user_modules: Collection[str], numerical: bool = True
) -> Callable:
    """The function a file names, under the function rule (raises Refused): one registered
    with Keras or passed in `custom_objects`, else (in safe mode) an allow-listed numerical
    function (unless `numerical` is false, as for a `method=`) or a top-level function of a
    module in `user_modules` (those defining a user class the file builds), else (outside safe
    mode) whatever function its module, imported if need be, defines under that name.
    """
    if "registered" in entry:
        return _registered_function(entry["registered"])
    module_name, qualname = entry["module"], entry["qualname"]
    # custom_objects given to load_model are keyed by plain name.
    fn = keras.saving.get_registered_object(qualname)
    if _is_function(fn):
        return fn
    if not safe:  # the user trusts the file: import and resolve as named
        return _imported_function(module_name, qualname)
    return _trusted_function(module_name, qualname, user_modules, numerical)


def _registered_function(name: str) -> Callable:
    fn = keras.saving.get_registered_object(name)
    if not _is_function(fn):
        raise Refused(
            f"function {name!r} is not registered. Import the module that registers it with "
            "@keras.saving.register_keras_serializable(), or pass it in custom_objects."
        )
    return fn


def _imported_function(module_name: str, qualname: str) -> Callable:
    """Outside safe mode: the function as named, importing its module if need be."""
    if module_name not in sys.modules:
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise Refused(f"importing {module_name!r} failed: {e}") from e
    fn = lookup(module_name, qualname)
    if _is_function(fn):
        return fn
    raise Refused(f"{module_name}.{qualname} is not a function defined there.")


def _trusted_function(
    module_name: str, qualname: str, user_modules: Collection[str], numerical: bool
) -> Callable:
    """In safe mode: an allow-listed numerical function, or one next to a user class built."""
    fn = lookup(module_name, qualname)
    if numerical and numerical_name(fn) is not None:
        return fn
    if (
        inspect.isfunction(fn)
        and "." not in qualname
        and fn.__module__ == module_name
        and module_name in user_modules
    ):
        return fn
    if module_name not in sys.modules:
        why = (
            f"its module {module_name!r} is not imported, and safe loading never imports "
            f"what a file names. Import {module_name!r} first, register the function, or "
            "pass it in custom_objects."
        )
    else:
        why = (
            "Safe loading resolves only the allowed numerical functions of jax, flax and "
            "numpy (activations, initializers, elementwise and reduction functions), "
            "functions registered with Keras or passed in custom_objects, and top-level "
            "functions of the module that defines a class the file builds. Register it, "
            "pass it in custom_objects, or pass safe_mode=False to load_model if you trust "
            "the file."
        )
    raise Refused(f"function {module_name}.{qualname} is refused. {why}")
