"""Odd files fail with flaxlayer's SerializationError naming the entry (no raw
AttributeError, AssertionError, RecursionError or TypeError), and a model whose class lives
in `__main__` warns when saved and says what is missing when loaded elsewhere."""

import pytest

from attack_kit import (
    Attack,
    custom_config,
    module_entry,
    names_of,
    nested_dicts,
    nested_lists,
    nested_tuples,
    refused,
    set_field,
    tup,
)

ERROR_ATTACKS = [
    # No raw AttributeError, AssertionError, RecursionError or TypeError.
    Attack(
        "err_custom_config_without_from_config",
        "net",
        custom_config,
        ("Net", ("custom_config", "from_config")),
    ),
    Attack(
        "err_parent_field",
        "net",
        set_field("parent", module_entry("attack_user_models", "Net", features=2)),
        ("parent",),
    ),
    # JSON nesting stays under json.loads's own limit (~1000 levels): the file reaches us.
    Attack("err_deep_list_nesting", "net", set_field("act", nested_lists(900)), ("act",)),
    Attack("err_deep_tuple_nesting", "net", set_field("act", nested_tuples(450)), ("act",)),
    Attack("err_deep_dict_nesting", "net", set_field("act", nested_dicts(900)), ("act",)),
    Attack("err_field_wrong_type", "net", set_field("features", "abc"), ("features",)),
    Attack("err_field_not_callable", "net", set_field("act", 5), ("act",)),
    Attack("err_extra_positional", "tolinen", set_field("args", tup(3, 2, 4, 99)), ("args",)),
]

MAIN_CLASS_MISSING = Attack("err_main_class_missing", "main_class")

ATTACKS = [*ERROR_ATTACKS, MAIN_CLASS_MISSING]
BY_NAME = {a.name: a for a in ATTACKS}


def test_serialization_error_is_exported():
    """flaxlayer exports SerializationError, a ValueError."""
    import flaxlayer

    assert issubclass(flaxlayer.SerializationError, ValueError)
    assert "SerializationError" in flaxlayer.__all__


@pytest.mark.parametrize("name", names_of(ERROR_ATTACKS))
def test_odd_file_raises_serialization_error_naming_the_entry(name, main_run):
    """A custom_config on a class without from_config (AttributeError today), a
    `parent` field (AssertionError), nesting deep enough to exhaust Python's stack
    (RecursionError), wrong-typed fields and an extra positional argument (TypeError) give a
    SerializationError naming the entry."""
    refused(main_run, BY_NAME[name])


def test_saving_a_main_class_warns(saved):
    """Saving a model whose module class is defined in `__main__` warns that only a
    process whose `__main__` defines that class can load it."""
    messages = [m for _, m in saved.main_class_warnings if "__main__" in m]
    assert messages, f"no warning about __main__; got {saved.main_class_warnings}"
    assert any("LocalNet" in m for m in messages), messages


def test_loading_a_main_class_where_main_lacks_it_says_so(main_run):
    """Loading that file in a process whose `__main__` lacks the class says the class
    is missing and how to make it importable, not that the file was tampered with."""
    result = refused(main_run, MAIN_CLASS_MISSING)
    message = result["error"]
    assert "__main__" in message and "LocalNet" in message, message
    assert "tamper" not in message.lower(), message
    assert "import" in message.lower(), message
