"""`method` by name in a crafted file: only a method the user's class (or a user base)
defines, never Flax's own API (tabulate, init, apply, sow, ...)."""

import pytest

from attack_kit import (
    Attack,
    method_by_name,
    names_of,
    refused,
)

LINEN_API_METHODS = ("tabulate", "init", "apply", "bind", "sow", "__init__", "__setattr__")
NNX_API_METHODS = ("sow", "eval", "train", "set_attributes", "perturb", "__init__")
METHOD_ATTACKS = (
    [Attack(f"method_linen_{m}", "net_method", method_by_name(m), (m,)) for m in LINEN_API_METHODS]
    + [
        Attack(
            "method_linen_bound_tabulate",
            "net_method",
            method_by_name("tabulate", "bound"),
            ("tabulate",),
        )
    ]
    + [Attack(f"method_nnx_{m}", "mlp_method", method_by_name(m), (m,)) for m in NNX_API_METHODS]
)

ATTACKS = list(METHOD_ATTACKS)
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(METHOD_ATTACKS))
def test_method_by_name_is_never_flax_api(name, main_run):
    """`method` by name resolves only to a method the user's class (or a user base)
    defines; Module.tabulate/init/apply/bind/sow/__init__/__setattr__ and NNX's
    sow/eval/train/set_attributes/perturb/__init__ are refused and never run (no table
    printed, no Flax API call recorded)."""
    result = refused(main_run, BY_NAME[name])
    assert result["api_calls"] == [], f"{name}: Flax API ran: {result['api_calls']}"
    assert "┃" not in result["stdout"] and "Tabulate" not in result["stdout"]
