"""Mutated files, seeded: every one loads and predicts finite values, or is refused with a
flaxlayer.SerializationError (or by Keras before flaxlayer's code ran), with no side effect.

fuzz_kit.py says how the files are made, loaded (a child process under an address-space and a
time limit, `compile=False`) and judged. The JAX session loads FILES_PER_KIND[jax] files of each
module kind, the others a smaller sample with other seeds; the same seed gives the same files
on every run.
"""

import keras
import pytest

import fuzz_kit

BACKEND = keras.backend.backend()
FILES_PER_KIND = {"jax": 200, "tensorflow": 50, "torch": 50}
SEEDS = {"jax": 29, "tensorflow": 31, "torch": 37}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    counts = dict.fromkeys(fuzz_kit.BASES, FILES_PER_KIND[BACKEND])
    cases = fuzz_kit.write_cases(directory, counts, SEEDS[BACKEND])
    return cases, fuzz_kit.run_cases(cases, directory, BACKEND)


@pytest.mark.parametrize("base", sorted(fuzz_kit.BASES))
def test_every_mutated_file_loads_or_is_refused_cleanly(fuzzed, base):
    cases, results = fuzzed
    found = [
        fuzz_kit.describe(case, problems)
        for case in cases
        if case.base == base
        for problems in [fuzz_kit.problems(case, results[case.name])]
        if problems
    ]
    assert not found, f"{len(found)} mutated {base} files were not handled cleanly:\n" + "\n".join(
        found[:20]
    )


def test_the_mutations_reach_both_outcomes(fuzzed):
    """A fuzz whose every file loads (mutations that change nothing) or is refused (a broken
    harness) would prove nothing: most files of each kind are refused, and some load (of each
    kind in the JAX session's larger sample)."""
    cases, results = fuzzed
    loaded = {base: 0 for base in fuzz_kit.BASES}
    for case in cases:
        loaded[case.base] += bool(results[case.name].get("loaded"))
    per_kind = FILES_PER_KIND[BACKEND]
    assert all(n <= per_kind // 2 for n in loaded.values()), loaded
    assert sum(loaded.values()) >= 2, loaded
    if per_kind >= 100:
        assert all(loaded.values()), loaded


def test_mutations_are_the_same_for_the_same_seed():
    config = {
        "config": {
            "layers": [
                {
                    "registered_name": "flaxlayer>FlaxLayer",
                    "config": {"name": "a", "module": {"x": [1, 2, {"y": "z"}]}},
                    "build_config": {"input_spec": {"shape": [None, 3], "dtype": "float32"}},
                }
            ]
        }
    }
    first = [fuzz_kit.mutate(config, seed) for seed in range(20)]
    assert first == [fuzz_kit.mutate(config, seed) for seed in range(20)]
    assert len({repr(m) for m in first}) > 10  # seeds differ, files differ


RESULT = {
    "loaded": False,
    "serialization_error": False,
    "weights_refusal": False,
    "keras_before_flaxlayer": False,
    "error_type": "builtins.TypeError",
    "error": "unhashable type: 'dict'",
    "changed": [],
    "new_modules": [],
    "written": [],
    "peak_rise_mib": 1.0,
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({}, "TypeError"),
        ({"serialization_error": True, "written": ["/tmp/x"]}, "wrote /tmp/x"),
        ({"serialization_error": True, "changed": ["jax.config"]}, "changed"),
        ({"serialization_error": True, "new_modules": ["subprocess"]}, "imported"),
        ({"serialization_error": True, "peak_rise_mib": 5000.0}, "resident memory"),
        ({"loaded": True, "finite": False}, "non-finite"),
        ({"died": "exit code -9"}, "died"),
    ],
)
def test_the_judge_names_each_kind_of_failure(change, needle):
    case = fuzz_kit.Case("linen_cnn-0", "linen_cnn", 0, ["replace config/seed"], "x.keras")
    found = fuzz_kit.problems(case, {**RESULT, **change})
    assert any(needle in p for p in found), found
    assert fuzz_kit.problems(case, {**RESULT, "serialization_error": True}) == []


def test_the_saving_page_states_the_promise_as_this_test_checks_it():
    page = " ".join((fuzz_kit.GOLDEN.parents[1] / "docs" / "saving.md").read_text().split())
    kinds = len(fuzz_kit.BASES)
    assert f"{kinds * FILES_PER_KIND['jax']} files on JAX" in page
    assert f"{kinds * FILES_PER_KIND['torch']} on TensorFlow and PyTorch" in page
    assert FILES_PER_KIND["tensorflow"] == FILES_PER_KIND["torch"]
    assert f"limited to {fuzz_kit.ADDRESS_HEADROOM // 2**30} GiB above" in page
    assert "`compile=False`" in page
    readme = " ".join((fuzz_kit.GOLDEN.parents[1] / "README.md").read_text().split())
    assert f"fuzz test of {kinds * sum(FILES_PER_KIND.values()):,} mutated files" in readme
