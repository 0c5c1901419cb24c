"""Functions a crafted file names: anything outside the explicit allow-list is refused before
it runs (nothing printed, registered, configured or traced)."""

import pytest

from attack_kit import (
    PWNED,
    Attack,
    call_at_build,
    class_entry,
    factory,
    fn,
    names_of,
    refused,
    set_field,
    tup,
)

FUNCTION_ATTACKS = [
    # Called by nn.Dense at build (dot_general_cls), arguments from the file.
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

ATTACKS = FUNCTION_ATTACKS
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(FUNCTION_ATTACKS))
def test_function_outside_the_allow_list_is_refused_before_it_runs(name, main_run):
    """Functions that print, register, change configuration or global state, or trace
    (set_printoptions, Flax's register_*, named_call toggles, logical axis rules,
    jax.config.update, jax.debug.*, display, tabulate, the initializers modules' non-factory
    helpers) are refused; nn.Dense would call them at build with the file's arguments. Judged
    by the process-wide settings (unchanged) and stdout (nothing printed)."""
    refused(main_run, BY_NAME[name])
