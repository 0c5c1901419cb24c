"""Flax's bridge classes and NNX variable hooks in a crafted file: ToLinen builds only a user
NNX class, and no function the file chose runs as a metadata hook."""

import pytest

from attack_kit import (
    PWNED,
    Attack,
    chain,
    class_entry,
    fn,
    module_entry,
    names_of,
    nnx_metadata,
    on_module,
    partial,
    pydict,
    refused,
    set_field,
    tolinen,
    tup,
)

BRIDGE_ATTACKS = [
    # ToLinen calls nnx_class(*args, **kwargs) at build.
    Attack(
        "tolinen_nnx_class_set_printoptions",
        "tolinen",
        tolinen(
            nnx_class=fn("jax.numpy", "set_printoptions"),
            kwargs=pydict(precision=1, linewidth=21),
            skip_rng=True,
        ),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_register_variable_name",
        "tolinen",
        tolinen(
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
        chain(
            tolinen(
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
        tolinen(
            nnx_class=fn("attack_user_models", "write_report"),
            args=lambda target: tup(target, module_entry("attack_user_models", "Net", features=1)),
            skip_rng=True,
        ),
        ("nnx_class",),
    ),
    Attack(
        "tolinen_nnx_class_jnp_zeros",
        "tolinen",
        tolinen(nnx_class=fn("jax.numpy", "zeros"), args=tup(50_000_000), skip_rng=True),
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
        nnx_metadata(
            "linear1.kernel",
            "on_create_value",
            partial(fn("flax.nnx", "display"), PWNED + " on_create_value"),
        ),
        ("on_create_value",),
    ),
    Attack(
        "nnx_metadata_on_create_value_register",
        "mlp",
        nnx_metadata("linear1.kernel", "on_create_value", fn("flax.nnx", "register_variable_name")),
        ("on_create_value",),
    ),
    Attack(
        "nnx_metadata_on_get_value_display",
        "mlp",
        nnx_metadata(
            "linear1.kernel",
            "on_get_value",
            partial(fn("flax.nnx", "display"), PWNED + " on_get_value"),
        ),
        ("on_get_value",),
    ),
]

ATTACKS = [*BRIDGE_ATTACKS, *HOOK_ATTACKS]
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(BRIDGE_ATTACKS))
def test_bridge_calls_nothing_the_file_chose(name, main_run):
    """ToLinen's nnx_class must be an NNX Module class that passes the class-reference checks
    (not a
    function, a registry, a numpy/jax callable, the user's helper, a Linen class) and its
    metadata_fn an allowed function; refused before anything is called."""
    refused(main_run, BY_NAME[name])


@pytest.mark.parametrize("name", names_of(HOOK_ATTACKS))
def test_nnx_variable_hooks_from_the_file_never_run(name, main_run):
    """Beyond ToLinen: NNX calls a Variable's metadata hooks (on_create_value while
    the file is decoded, on_get_value at every read) with arguments of its choosing; a hook in
    a variable's metadata is a function position like any other (here: display, a registry)
    and is refused, naming the metadata key."""
    refused(main_run, BY_NAME[name])
