"""The benchmark report's goals table: which goals exist, how each verdict is reached, and what
`make bench`'s exit code says. Run on synthetic timings: no benchmark is measured here."""

import importlib.util
import sys
from pathlib import Path

import keras
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    if keras.backend.backend() != "jax":
        pytest.skip("the report is pure Python: checked once, in the jax session")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def run():
    return load_script("run")


def synthetic(run, seconds):
    """Every item a full run measures, each taking `seconds(backend, key, variant)`."""
    config = run.CONFIGS["full"]
    keys = [(f"fit/{w}", run.FIT_VARIANTS) for w in config["fit"]]
    keys += [
        (f"eager/b{b}", run.EAGER_VARIANTS + (run.EAGER_EXTRA if b in (1, 32) else ()))
        for b in config["eager_batches"]
    ]
    items = [run.Item("jax", k, v, [seconds("jax", k, v)] * 3) for k, vs in keys for v in vs]
    for backend in run.BACKENDS:
        for v in run.BACKEND_VARIANTS:
            items.append(run.Item(backend, "backend/cnn", v, [seconds(backend, "cnn", v)] * 3))
        items.append(
            run.Item(backend, "backend/eager", "ours/call", [seconds(backend, "e", "")] * 3)
        )
    items.append(run.Item("jax", "backend/eager", "apply/jit", [1.0] * 3))
    builds = {
        case: [{"seconds": 10.0, "peak": 1.1 * run.build_memory.PARAM_BYTES}] * 3
        for case in run.BUILD_CASES
    }
    return config, items, builds


def test_every_goal_of_a_full_run_is_in_the_table(run):
    config = run.CONFIGS["full"]
    table = run.goals(config, set(run.SECTIONS))
    # 23 ratio goals; the report adds a 24th, the outputs check (max abs difference). T1:
    # 2 batches x (Linen, NNX, JaxLayer) x (device, NumPy inputs), and TF and torch eager.
    assert len(table) == 23
    assert len({g.name for g in table}) == 23
    assert len([g for g in table if g.name.startswith("T1")]) == 14
    assert {g.name[:2] for g in table} == {"T1", "T2", "T3", "T4"}
    only_fit = run.goals(config, {"fit"})
    assert {g.section for g in only_fit} == {"fit"} and len(only_fit) == 5


def test_verdicts_and_the_summary_line(run):
    def seconds(backend, key, variant):
        if backend != "jax" and key == "e":
            return 4.0  # eager on TF/torch: 4x jax.jit(module.apply), over the 3x goal
        return 1.0

    config, items, builds = synthetic(run, seconds)
    targets = run.evaluate_goals(run.goals(config, set(run.SECTIONS)), items, builds)
    verdicts = {t.name: t.verdict for t in targets}
    failed = sorted(name for name, verdict in verdicts.items() if verdict == "FAIL")
    assert failed == [
        "T1 eager flaxlayer.FlaxLayer layer(x), batch 32, tensorflow backend: "
        "vs jax.jit(module.apply)",
        "T1 eager flaxlayer.FlaxLayer layer(x), batch 32, torch backend: vs jax.jit(module.apply)",
    ]
    assert verdicts["T3 build peak memory / param bytes"] == "PASS"  # 1.1x <= 1.2x
    lines = run._summary_lines({"targets": targets})
    assert lines[-1].startswith("21 of 23 goals met, 2 missed (FAIL).")
    assert "exits 1 when any goal is missed, as it did" in lines[-1]


def test_eager_goals_compare_numpy_calls_with_jit_on_numpy(run):
    def seconds(backend, key, variant):
        if variant in ("apply/jitnp", "ours/callnp", "nnx/callnp", "jaxlayer/callnp"):
            return 3.0  # NumPy calls: slow, and as slow as jax.jit on NumPy
        return 1.0

    config, items, builds = synthetic(run, seconds)
    targets = run.evaluate_goals(run.goals(config, {"eager"}), items, builds)
    numpy_goals = [t for t in targets if "on NumPy" in t.name]
    assert len(numpy_goals) == 6 and all(t.stat.median == 1.0 for t in numpy_goals)


def test_backend_steps_are_judged_against_keras_layers_on_that_backend(run):
    def seconds(backend, key, variant):
        if key == "cnn" and backend != "jax":  # both 2x JAX; torch's ours 1.2x its native
            return 2.4 if (backend, variant) == ("torch", "ours/spe1") else 2.0
        return 1.0

    config, items, builds = synthetic(run, seconds)
    targets = run.evaluate_goals(run.goals(config, {"backends"}), items, builds)
    verdicts = {t.name: t.verdict for t in targets if t.name.startswith("T4")}
    assert verdicts == {
        "T4 fit cnn step time, tensorflow: ours / the CNN in Keras layers": "PASS",
        "T4 fit cnn step time, torch: ours / the CNN in Keras layers": "FAIL",
    }


def test_a_miss_within_noise_passes_and_says_so(run):
    def seconds(backend, key, variant):
        return 1.03 if variant.startswith("ours/spe") else 1.0  # ours 3% slower than keras

    config, items, builds = synthetic(run, seconds)
    targets = run.evaluate_goals(run.goals(config, {"fit"}), items, builds)
    ours_vs_keras = [t for t in targets if t.name.endswith("ours / keras")]
    assert ours_vs_keras and all(t.verdict == "PASS (within noise)" for t in ours_vs_keras)


def test_finetune_report_gives_each_figure_and_the_goal_verdict():
    finetune = load_script("finetune")
    figures = {"params": 1000, "trainable": 1000, "optimizer_bytes": 8000, "step": 0.010}
    lora = {"params": 1040, "trainable": 40, "optimizer_bytes": 320, "step": 0.008}
    text = finetune.markdown({"full": figures, "lora": lora}, width=256, repeats=3)
    assert "| trainable parameters | 1,000 | 40 | 0.040 |" in text
    assert "| step time (ms, median) | 10 | 8 | 0.800 |" in text
    assert "at most 5% of full fine-tuning's: met (4.00%)" in text
    lora["optimizer_bytes"] = 480
    text = finetune.markdown({"full": figures, "lora": lora}, width=256, repeats=3)
    assert "MISSED (6.00%)" in text


def test_backend_profile_report_gives_each_part_and_the_floor():
    profile = load_script("backend_profile")
    ms = 1e-3
    native = {"forward": 2 * ms, "forward+backward": 6 * ms, "step": 8 * ms, "update": 3 * ms}
    ours = {"forward": 3 * ms, "forward+backward": 8 * ms, "step": 12 * ms, "update": 3 * ms}
    results = {
        "jax": {"jax": {"forward": 1 * ms, "forward+backward": 5 * ms}},
        "tensorflow": {"keras layers": native, "flaxlayer": ours},
        "torch": {"keras layers": {**native, "step": 16 * ms}, "flaxlayer": ours},
    }
    text = profile.markdown(results, repeats=3, calls=10)
    assert "| tensorflow | the CNN in Keras layers | 2.00 | 6.00 | 8.00 | 3.00 | 1.00x |" in text
    assert "| tensorflow | flaxlayer | 3.00 | 8.00 | 12.00 | 3.00 | 1.50x |" in text
    assert "| torch | flaxlayer | 3.00 | 8.00 | 12.00 | 3.00 | 0.75x |" in text
    # The floor: JAX's own forward + backward (5 ms) + the backend's update alone (3 ms).
    assert "| tensorflow | 8.00 | 1.00x |" in text
    assert "| torch | 8.00 | 0.50x |" in text
    lines = text.splitlines()
    start = lines.index("<!-- --8<-- [start:results] -->")
    assert lines.index("<!-- --8<-- [end:results] -->") > start


def test_hf_zoo_report_counts_checks_per_library_and_backend():
    zoo = load_script("hf_zoo")
    every = dict.fromkeys(zoo.CHECKS, "pass")
    ours = {"results": {"bert": every, "vit": every}, "seconds": {"bert": 3.0, "vit": 2.0}}
    theirs = {
        "results": {"bert": {**every, "load": "fail: TypeError: Cannot serialize"}, "vit": every},
        "seconds": {"bert": 4.0, "vit": 1.0},
    }
    text = zoo.markdown({("flaxlayer", "jax"): ours, ("keras", "jax"): theirs}, ["bert", "vit"])
    assert "flaxlayer on jax: 2 of 2; keras on jax: 1 of 2." in text
    assert "| bert | 12345 | 1234 |" in text
    assert "| **checks passed** | 10/10 | 9/10 |" in text
    assert "- keras (jax), bert, load: TypeError: Cannot serialize" in text
    start, end = text.index("[start:results]"), text.index("[end:results]")
    assert start < text.index("| **checks passed**") < end
