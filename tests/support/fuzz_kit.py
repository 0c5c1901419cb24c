"""The loading fuzz test's harness: seeded random mutations of real `.keras` files, each loaded in
a child process under an address-space and a time limit, judged by outcome and side effects.

The files are the golden files of the file format (tests/golden/files: a Linen CNN with
BatchNorm, Dropout and a dataclass config; an NNX module with BatchNorm and Dropout; a
JaxLayer with registered functions; a fine-tuned model with LoRA and int8). Each mutated file
changes one to three places of the flaxlayer layer's entry (its config and build config) as an
attacker would: a value's type swapped, a number made extreme or negative, a key deleted or
added, a value nested deep, a string made long or pointed at another module, class, function
or dtype, a shape changed. `mutate` is a pure function of (config, seed): the same seed gives
the same file on every run and machine.

A child (fuzz_child.py) loads the files one after the other and reports after each; the parent
restarts it after the file it died or hung on. Every file must load and predict finite values,
or be refused with a `flaxlayer.SerializationError` (Keras may wrap it: it stays in the
chain; while the weights file is read, Keras's own ValueError quotes its message instead), or
by Keras itself before flaxlayer's code ran. Whatever the outcome: no file written,
no process-wide setting changed (load_probe.observe), no module imported that was not
imported before, no resident memory grown beyond MAX_RISE_MIB, no crash, no hang.
"""

import copy
import dataclasses
import json
import os
import pathlib
import random
import subprocess
import sys
import zipfile

from helpers import SUPPORT_DIR, read_keras_zip

GOLDEN = pathlib.Path(SUPPORT_DIR).parent / "golden"
#: The module kinds fuzzed: name of a golden file -> what it is.
BASES = {
    "linen_cnn": "Linen with BatchNorm, Dropout and a dataclass config",
    "nnx": "NNX with BatchNorm and Dropout",
    "jax_layer": "JaxLayer with registered functions",
    "lora_int8": "fine-tuned Linen (LoRA and int8)",
}
#: How far a load may raise resident memory above what the child held before it.
MAX_RISE_MIB = 400
#: Address space the child may map beyond what it holds after legitimate loads.
ADDRESS_HEADROOM = 6 * 2**30
#: A file whose load shows no progress for this long is a hang.
HANG_SECONDS = 120
TAG = "__flaxlayer__"
#: The parts of the layer's entry flaxlayer reads (Keras reads its class name and inbound nodes).
FUZZED = ("config", "build_config")

# ------------------------------------------------------------------------------- mutation

NAMES = (
    "os", "system", "builtins", "eval", "exec", "__import__", "subprocess", "Popen",
    "shutil.rmtree", "golden_models", "GoldenCNN", "GoldenNNX", "GoldenMLP", "CNNConfig",
    "golden_init", "golden_call", "golden>golden_call", "flax.linen", "Dense", "BatchNorm",
    "flax.nnx", "Linear", "jax.numpy", "zeros", "keras.layers", "keras", "numpy", "save",
    "__main__", "functools", "partial", "flaxlayer", "FlaxLayer", "JaxLayer", "tabulate",
    "__call__", "__init__", "__class__", "__dict__", "sow", "apply", "init", "",
)  # fmt: skip
DTYPES = (
    "float64", "float16", "bfloat16", "int8", "int4", "uint8", "bool", "complex128",
    "object", "U10", "V1000000000", "str", "float8_e4m3fn", "float", "int", "",
)  # fmt: skip
SHAPES = ([2**31], [10**9, 4], [-1], [], [0], [None], [1.5], ["a"], [3, -4], [2**63])
NUMBERS = (0, 1, -1, -(2**31), 2**31, 2**63, 10**9, 10**30, 0.5, -0.5, 1e308, -1e308, 1e-308)
KEYS = (
    TAG, "module", "qualname", "class", "fields", "name", "kind", "id", "shape", "dtype",
    "items", "registered", "attributes", "metadata", "data", "config", "extra", "args",
)  # fmt: skip


def _typed_value(rng: random.Random):
    return rng.choice(
        [None, True, False, 0, -1, 2.5, "x", [], {}, [1, 2], {"a": 1}, {TAG: "tuple", "items": []}]
    )


def _nested(rng: random.Random):
    depth = rng.choice([40, 150, 300])
    kind = rng.choice(["list", "dict", "tuple"])
    value: object = 1
    for _ in range(depth):
        if kind == "list":
            value = [value]
        elif kind == "dict":
            value = {"a": value}
        else:
            value = {TAG: "tuple", "items": [value]}
    return value


def _long_string(rng: random.Random):
    return rng.choice(["a" * 1_000_000, "../" * 50 + "etc/passwd", "\x00", "x" * 300 + ".y"])


def _paths(node, path=()):
    """Every (path, value) under `node`, the node itself first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


TAGS = ("module", "class", "function", "partial", "tuple", "dict", "enum", "nnx", [], {}, 1, None)
#: Each move: a new value made from the random generator and the file's own strings.
MOVES = {
    "type": lambda rng, strings: _typed_value(rng),
    "number": lambda rng, strings: rng.choice(NUMBERS),
    "nest": lambda rng, strings: _nested(rng),
    "string": lambda rng, strings: _long_string(rng),
    "name": lambda rng, strings: rng.choice(NAMES),
    "sibling": lambda rng, strings: rng.choice(strings or list(NAMES)),
    "dtype": lambda rng, strings: rng.choice(DTYPES),
    "shape": lambda rng, strings: copy.deepcopy(rng.choice(SHAPES)),
    "tag": lambda rng, strings: rng.choice(TAGS),
}


def _replacement(rng: random.Random, key, value, strings: list):
    """A new value for `value` (found under `key`), as one of the attacker's moves would make."""
    moves = ["type", "number", "nest"]
    if isinstance(value, str):
        moves += ["string", "name", "name", "sibling", "dtype"]
    if isinstance(value, list) and all(isinstance(v, (int, type(None))) for v in value):
        moves += ["shape", "shape"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        moves += ["number", "number"]
    if key == TAG:
        moves += ["tag", "tag"]
    return MOVES[rng.choice(moves)](rng, strings)


def _mutate_once(rng: random.Random, entry: dict) -> str:
    found = [(p, v) for p, v in _paths(entry) if p and p[0] in FUZZED]
    strings = [v for _, v in found if isinstance(v, str)]
    path, value = rng.choice(found)
    parent = entry
    for part in path[:-1]:
        parent = parent[part]
    key = path[-1]
    action = rng.choice(["replace"] * 6 + ["delete", "add"])
    if action == "delete":
        del parent[key]
        return f"delete {_show(path)}"
    if action == "add" and isinstance(value, dict):
        new_key = rng.choice(KEYS)
        value[new_key] = _typed_value(rng) if rng.random() < 0.5 else rng.choice(NAMES)
        return f"add {_show((*path, new_key))}"
    parent[key] = _replacement(rng, key, value, strings)
    return f"replace {_show(path)}"


def _show(path) -> str:
    return "/".join(str(p) for p in path)


def layer_entry(config: dict) -> dict:
    """The model config's one flaxlayer layer entry (class name, config, build config)."""
    for entry in config["config"]["layers"]:
        if (entry.get("registered_name") or "").startswith("flaxlayer>"):
            return entry
    raise AssertionError("no flaxlayer layer in the config")


def mutate(config: dict, seed: int) -> tuple[dict, list[str]]:
    """A copy of a model `config` with one to three mutations of its flaxlayer layer's entry,
    a pure function of `seed`; with what was done."""
    rng = random.Random(seed)
    config = copy.deepcopy(config)
    entry = layer_entry(config)
    done = [_mutate_once(rng, entry) for _ in range(rng.choice([1, 1, 2, 3]))]
    return config, done


# ---------------------------------------------------------------------------------- files


@dataclasses.dataclass
class Case:
    name: str
    base: str
    seed: int
    mutations: list
    path: str


def write_cases(directory: pathlib.Path, counts: dict[str, int], seed: int) -> list[Case]:
    """`counts[base]` mutated copies of each golden file in `directory`, seeds from `seed`."""
    cases = []
    for base, count in counts.items():
        members = read_keras_zip(GOLDEN / "files" / f"{base}.keras")
        config = json.loads(members["config.json"])
        for i in range(count):
            case_seed = seed * 1_000_003 + hash_name(base) * 10_007 + i
            mutated, mutations = mutate(config, case_seed)
            path = directory / f"{base}-{i}.keras"
            with zipfile.ZipFile(path, "w") as z:
                for name, data in members.items():
                    z.writestr(name, json.dumps(mutated) if name == "config.json" else data)
            cases.append(Case(f"{base}-{i}", base, case_seed, mutations, str(path)))
    return cases


def hash_name(name: str) -> int:
    """A stable small number for `name` (Python's hash of a str changes between runs)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 9973


# ------------------------------------------------------------------------------ the child

CHILD = pathlib.Path(SUPPORT_DIR) / "fuzz_child.py"


def run_cases(cases: list[Case], directory: pathlib.Path, backend: str) -> dict[str, dict]:
    """Loads every case in children (restarted after a crash or a hang); returns the report
    per case name."""
    results: dict[str, dict] = {}
    remaining = list(cases)
    while remaining:
        plan = directory / "plan.json"
        plan.write_text(json.dumps([dataclasses.asdict(c) for c in remaining]))
        reports, outcome = _run_child(plan, directory, backend)
        results.update({r["name"]: r for r in reports})
        done = {r["name"] for r in reports}
        left = [c for c in remaining if c.name not in done]
        if not left:
            break
        # The child died or hung on the first case it never reported.
        results[left[0].name] = {"name": left[0].name, "died": outcome}
        remaining = left[1:]
    return results


def _run_child(plan: pathlib.Path, directory: pathlib.Path, backend: str) -> tuple[list, str]:
    workdir = directory / "cwd"
    workdir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        XLA_FLAGS="--xla_backend_optimization_level=0",
        PYTHONPATH=os.pathsep.join([SUPPORT_DIR, str(GOLDEN)]),
        FLAXLAYER_FUZZ_PLAN=str(plan),
        FLAXLAYER_FUZZ_INPUTS=str(GOLDEN / "files"),
        FLAXLAYER_FUZZ_HEADROOM=str(ADDRESS_HEADROOM),
    )
    reports_path = directory / "reports.jsonl"
    reports_path.write_text("")
    process = subprocess.Popen(
        [sys.executable, str(CHILD), str(reports_path)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    outcome = _watch(process, reports_path)
    reports = [json.loads(line) for line in reports_path.read_text().splitlines() if line]
    if not any(r.get("ready") for r in reports):
        raise AssertionError(f"the fuzz child failed before the first file: {outcome}")
    return [r for r in reports if "name" in r], outcome


def _watch(process: subprocess.Popen, reports_path: pathlib.Path) -> str:
    """Waits for the child, killing it when its report file stops growing for HANG_SECONDS."""
    size, quiet = -1, 0.0
    while True:
        try:
            process.wait(timeout=2)
            stderr = process.stderr.read() if process.stderr else ""
            return f"exit code {process.returncode}: {stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            pass
        now = reports_path.stat().st_size
        quiet = 0.0 if now != size else quiet + 2
        size = now
        if quiet >= HANG_SECONDS:
            process.kill()
            process.wait()
            return f"hung: no progress for {HANG_SECONDS} s"


# ---------------------------------------------------------------------------------- judging


def problems(case: Case, result: dict) -> list[str]:
    """What is wrong with a case's outcome; empty when it was handled cleanly."""
    if "died" in result:
        return [f"the child died: {result['died']}"]
    found = [f"wrote {w}" for w in result["written"]]
    if result["changed"]:
        found.append(f"changed {result['changed']}")
    if result["new_modules"]:
        found.append(f"imported {result['new_modules']}")
    if result["peak_rise_mib"] > MAX_RISE_MIB:
        found.append(f"resident memory rose {result['peak_rise_mib']} MiB")
    if result["loaded"]:
        if not result.get("finite", False):
            found.append(f"loaded, but predicted {result.get('predict_error', 'non-finite')}")
    elif not any(
        result[k] for k in ("serialization_error", "weights_refusal", "keras_before_flaxlayer")
    ):
        found.append(f"{result['error_type']}: {result['error'][:600]}")
    return found


def describe(case: Case, found: list[str]) -> str:
    mutations = "; ".join(m[:120] for m in case.mutations)
    return f"{case.name} (seed {case.seed}; {mutations}): {'; '.join(found)}"
