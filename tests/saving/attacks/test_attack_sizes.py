"""Sizes and values in a crafted file: scalar and dtype entries take numbers only, and loading
allocates nothing sized by the config (variables, features, input specs, JaxLayer params,
RNG keys), judged by the peak memory of a fork that loaded only that file."""

import os

import pytest

from attack_kit import (
    BASELINE,
    MAX_RISE_MIB,
    Attack,
    ChildRun,
    chain,
    class_entry,
    dtype_entry,
    factory,
    fn,
    given_variables,
    input_spec,
    jax_param_shape,
    names_of,
    nnx_attr,
    nnx_widen,
    refused,
    scalar,
    set_field,
    tolinen,
    tup,
)

ENTRY_ATTACKS = [
    # Scalar and dtype entries accept numeric dtypes and JSON numbers only.
    Attack("scalar_object_dtype", "net", set_field("features", scalar("object", 4)), ("object",)),
    Attack("scalar_unicode_dtype", "net", set_field("features", scalar("U10", 4)), ("U10",)),
    Attack(
        "scalar_string_value", "net", set_field("features", scalar("int64", "4")), ("features",)
    ),
    Attack("dtype_object", "dense", set_field("param_dtype", dtype_entry("object")), ("object",)),
    Attack("dtype_unicode", "dense", set_field("param_dtype", dtype_entry("U10")), ("U10",)),
    Attack(
        "dtype_huge_void",
        "dense",
        set_field("param_dtype", dtype_entry("V1000000000")),
        ("V1000000000",),
    ),
]

MEMORY_ATTACKS = [
    # Each would take 2 GB or more; the peak may rise by MAX_RISE_MIB at most.
    # The brief's 1-D shape: fails while Keras builds the model (the Linear cannot run).
    Attack(
        "mem_nnx_variable_shape",
        "mlp",
        nnx_attr("linear1.kernel", "shape", [400_000_000]),
        ("linear1", "kernel", "400000000"),
        child="memory",
        weights_error=True,
    ),
    # Widened consistently (the model builds): fails only on the stored weights.
    Attack(
        "mem_nnx_hidden_width",
        "mlp",
        nnx_widen(75_000_000),
        ("linear1", "kernel", "(3, 4)", "(3, 75000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_linen_features",
        "net",
        set_field("features", 50_000_000),
        ("dense/kernel", "(3, 4)", "(3, 50000000)"),
        child="memory",
        load={"compile": False},
        weights_error=True,
    ),
    # The same with the file's compile config (plain SGD: Keras's optimizer adds no slots).
    Attack(
        "mem_linen_features_compiled",
        "net_compiled",
        set_field("features", 50_000_000),
        ("dense/kernel", "(3, 4)", "(3, 50000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_build_config_input_width",
        "net",
        input_spec([None, 100_000_000]),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_jaxlayer_params_shape",
        "jaxlayer",
        chain(jax_param_shape("w", [3, 100_000_000]), jax_param_shape("b", [100_000_000])),
        ("w", "(3, 2)", "(3, 100000000)"),
        child="memory",
        weights_error=True,
    ),
    # The shapes of variables given at construction (a decode cache's full length), which a
    # loaded layer is built to: placeholders until the weights file confirms them.
    Attack(
        "mem_linen_given_variables_shape",
        "net",
        given_variables({"params": {"dense": {"kernel": [3, 100_000_000], "bias": [100_000_000]}}}),
        ("dense/kernel", "(3, 4)", "(3, 100000000)"),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_tolinen_wide_nnx_linear",
        "tolinen",
        tolinen(nnx_class=class_entry("flax.nnx.nn.linear", "Linear"), args=tup(3, 15_000_000)),
        child="memory",
        weights_error=True,
    ),
    Attack(
        "mem_tolinen_nnx_class_jnp_ones",
        "tolinen",
        tolinen(nnx_class=fn("jax.numpy", "ones"), args=tup(600_000_000), skip_rng=True),
        ("nnx_class",),
        child="memory",
    ),
    Attack(
        "mem_factory_not_a_factory",
        "net",
        set_field(
            "kernel_init",
            factory(
                "jax._src.nn.initializers",
                "ones",
                {"key": 0, "shape": tup(600_000_000), "dtype": dtype_entry("float32")},
            ),
        ),
        ("ones",),
        child="memory",
    ),
    # Last: the largest single allocation (+3 GB on the first version; larger ones crashed).
    Attack(
        "mem_scalar_void",
        "net",
        set_field("features", scalar("V1", 200_000_000)),
        ("V1",),
        child="memory",
    ),
]

# An RNG key's shape is in no weights file (keys are re-made from the layer's seed at every
# call): a [50000000] key in a Dropout's stream is 400 MB (~1 GB to make) at every call.
RNG_KEY_ATTACK = Attack(
    "mem_nnx_rng_key_shape",
    "mlp_dropout",
    nnx_attr("dropout.rngs.key", "shape", [50_000_000]),
    ("key", "50000000"),
    child="memory",
)

ATTACKS = [*ENTRY_ATTACKS, *MEMORY_ATTACKS, RNG_KEY_ATTACK]
BY_NAME = {a.name: a for a in ATTACKS}


@pytest.mark.parametrize("name", names_of(ENTRY_ATTACKS))
def test_scalar_and_dtype_entries_accept_numbers_only(name, main_run):
    """Scalar entries take bool/int/uint/float/complex dtypes and JSON-number values;
    dtype entries numeric names only (not object, U10, V1000000000)."""
    refused(main_run, BY_NAME[name])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("name", names_of(MEMORY_ATTACKS))
def test_loading_allocates_nothing_sized_by_the_config(name, memory_run):
    """A ~1 KB config asking for 1-3 GB (an NNX variable of shape [400000000], a
    Linen features=50_000_000 with compile=False and with the file's compile config (plain
    SGD), a 100M-wide input in the build config, JaxLayer params of shape (3, 100M), ToLinen
    of a 15M-wide nnx.Linear or of jnp.ones(600M), a non-factory initializer `ones` called
    while decoding, a V1 scalar of 200 MB) raises the peak memory by less than MAX_RISE_MIB
    over loading the untampered file, and fails with SerializationError; where the weights
    disagree, the message names the path, the stored and the configured shape (Keras wraps
    errors raised while reading the weights in its own ValueError: accepted, with our text)."""
    _assert_memory_attack_refused(memory_run, name)


def _assert_memory_attack_refused(memory_run: ChildRun, name: str) -> None:
    attack = BY_NAME[name]
    result = memory_run.result(name)
    baseline = memory_run.result(BASELINE.name)
    assert baseline["loaded"], f"the baseline did not load: {baseline.get('error', '')[:2000]}"
    limit = baseline["peak_rise_mib"] + MAX_RISE_MIB
    outcome = (
        "it loaded"
        if result["loaded"]
        else f"{result.get('error_type')}: {result.get('error', '')[:300]}"
    )
    assert result["peak_rise_mib"] < limit, (
        f"{name}: peak memory rose by {result['peak_rise_mib']} MiB while loading (loading the "
        f"untampered file: {baseline['peak_rise_mib']} MiB; {outcome})"
    )
    refused(memory_run, attack)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_rng_key_shape_from_the_config_allocates_nothing(memory_run):
    """Beyond the weights check: an NNX RngKey's shape is stored in the config only
    (the weights file has no keys), and the layer re-makes keys of that shape at every call.
    A [50000000] key must be refused (SerializationError naming the key and the shape), not
    allocated while loading or at the first call."""
    _assert_memory_attack_refused(memory_run, RNG_KEY_ATTACK.name)
