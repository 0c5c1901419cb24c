"""Class references in a crafted file: a class resolves only from its defining module and as
the kind its position needs; functions are trusted only through user classes the file builds."""

import pytest

from attack_kit import (
    PWNED,
    Attack,
    call_at_build,
    chain,
    class_entry,
    fn,
    module_entry,
    module_of,
    names_of,
    nnx_attr,
    on_module,
    partial,
    ref,
    refused,
    set_field,
    write_report_at_build,
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
        nnx_attr("linear1", "class", ref("flax.nnx.variablelib", "Param")),
        ("Param",),
    ),
    Attack(
        "class_linen_module_as_nnx_variable",
        "mlp",
        nnx_attr("linear1.kernel", "class", ref("attack_user_models", "Net")),
        ("Net",),
    ),
]

TRUST_ATTACKS = [
    # Library classes only (nn.Dense); an unused class entry in a key nobody reads.
    Attack(
        "trust_from_class_entry_in_unread_key",
        "dense",
        chain(
            on_module(
                lambda m, t: m.__setitem__("decoy", class_entry("attack_user_models", "Net"))
            ),
            write_report_at_build,
        ),
        (("decoy", "write_report"),),
    ),
    # ... in a field value the module receives but never instantiates.
    Attack(
        "trust_from_class_entry_never_instantiated",
        "dense",
        chain(
            set_field("precision", class_entry("attack_user_models", "Net")), write_report_at_build
        ),
        ("write_report",),
    ),
    # ... a whole module entry, in a key the loader never decodes.
    Attack(
        "trust_from_module_entry_in_unread_key",
        "dense",
        chain(
            on_module(
                lambda m, t: m.__setitem__(
                    "decoy", module_entry("attack_user_models", "Net", features=1)
                )
            ),
            write_report_at_build,
        ),
        (("decoy", "write_report"),),
    ),
    # The script's own helper, "trusted" by a class entry naming `__main__` (Net is
    # attack_user_models's: the user class the file instantiates grants attack_user_models).
    Attack(
        "trust_main_from_decoy_class_entry",
        "net",
        chain(
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
        chain(
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
        chain(set_field("precision", class_entry("__main__", "Net")), write_report_at_build),
        (("__main__", "write_report"),),
    ),
    Attack(
        "trust_user_helper_named_in_main",
        "dense",
        chain(
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

ATTACKS = [*CLASS_ATTACKS, *TRUST_ATTACKS]
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(CLASS_ATTACKS))
def test_class_reference_must_name_the_defining_module_and_the_right_kind(name, main_run):
    """A class resolves only from its own defining module (`__main__` does not stand
    for a class the script imported; flax.linen does not stand for flax.linen.linear) and only
    as a subclass of what its position needs (Linen module, NNX node, NNX Variable type)."""
    refused(main_run, BY_NAME[name])


@pytest.mark.parametrize("name", names_of(TRUST_ATTACKS))
def test_functions_trusted_only_through_instantiated_user_classes(name, main_run):
    """A function is trusted through the defining module of a user Flax class the
    file actually builds. A class entry in an unread key, a class value never instantiated, a
    module entry the loader never builds, a class entry naming `__main__`, or a library class
    (nn.Dense) grants nothing: the user's `write_report` / the script's `script_report` never
    run (no file is written) and library helpers are refused."""
    refused(main_run, BY_NAME[name])
