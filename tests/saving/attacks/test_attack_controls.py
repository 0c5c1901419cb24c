"""Legitimate files keep loading in the attack setup, and no child ever printed an attack's marker.

Each family's untampered file (Linen with an activation and a configured initializer, the
user's own activation, a compiled model, methods by name incl. one inherited from a user base,
NNX, ToLinen of the user's NNX class, a JaxLayer) loads in the same fresh-process setup as the
attacks and predicts what the saved model did; so does a function passed in custom_objects."""

import numpy as np
import pytest

from attack_kit import (
    PWNED,
    WARM_UP_CONTROL,
    Attack,
    fn,
    names_of,
    no_side_effects,
    set_field,
)
from helpers import RESULT_MARKER

CONTROLS = [
    # Each loads in the same fresh-process setup and predicts what it did.
    WARM_UP_CONTROL,
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

ATTACKS = [*CONTROLS, CUSTOM_OBJECTS_CONTROL]
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(CONTROLS))
def test_untampered_file_loads_and_predicts_equal(name, saved, main_run):
    """Each family's legitimate file loads in the same fresh-process setup
    (Linen with an activation and configured initializer, the user's own activation, a
    compiled model, methods by name incl. one inherited from a user base, NNX, ToLinen of the
    user's NNX class, a JaxLayer) and predicts what the saved model did."""
    attack = BY_NAME[name]
    result = main_run.result(name)
    assert result["loaded"], f"{name}: {result.get('error_type')}: {result.get('error', '')[:2000]}"
    np.testing.assert_allclose(
        np.asarray(result["prediction"]), np.asarray(saved.predictions[attack.base]), atol=1e-6
    )
    no_side_effects(main_run, attack, result)
    assert result["peak_reset"] in (True, False)


def test_function_passed_in_custom_objects_loads(main_run):
    """A function the script passes in custom_objects (Keras's explicit
    trust) is used, even though it lives in `__main__`."""
    result = main_run.result(CUSTOM_OBJECTS_CONTROL.name)
    assert result["loaded"], f"{result.get('error_type')}: {result.get('error', '')[:2000]}"
    assert result["act"] == "__main__.double"
    no_side_effects(main_run, CUSTOM_OBJECTS_CONTROL, result)


def test_memory_child_control_loads(saved, memory_run):
    """The memory child's warm-up control loads (so a memory test cannot pass because
    loading is broken there)."""
    result = memory_run.result("control_linen_gelu_variance_scaling")
    assert result["loaded"], f"{result.get('error_type')}: {result.get('error', '')[:2000]}"
    np.testing.assert_allclose(
        np.asarray(result["prediction"]), np.asarray(saved.predictions["net"]), atol=1e-6
    )


def test_no_child_printed_an_attack_marker(main_run, memory_run):
    """Whatever got printed outside the load calls (C-level output, late callbacks)."""
    for run in (main_run, memory_run):
        printed = [line for line in run.stdout.splitlines() if not line.startswith(RESULT_MARKER)]
        assert not [line for line in printed if PWNED in line], printed[-20:]
        assert PWNED not in run.stderr, run.stderr[-2000:]
