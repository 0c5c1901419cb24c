"""The Hugging Face Flax zoo, five checks per architecture: flaxlayer.FlaxLayer vs
keras.layers.FlaxLayer.

Every Flax architecture transformers 4.x ships (the catalogue in tests/support/hf_zoo.py, tiny
configs, random weights), through the five checks of tests/real_models/test_hf_zoo.py:
1 construct, 2 `predict` equal to the transformers model's own call, 3 `fit` trains, 4 pure Flax
on the trained values gives the trained predictions, 5 the `.keras` file loads in a fresh
process with equal predictions.

- flaxlayer.FlaxLayer, on every backend, as a user writes it:
  `FlaxLayer(model.module, variables=model.params)`, the inputs a dict.
- keras.layers.FlaxLayer, JAX backend only (it supports no other): its `method` gets
  `(module, inputs, training)` with the inputs in one argument, so a multi-input module needs
  the wrapper function its docs show; here the one every architecture needs (the dict spread
  over the module's arguments, `head_mask=None` where the module takes one, outputs returned
  as plain dicts), registered for saving;
  variables given as its docs say, `{"params": model.params}`.

One worker process per backend and library; each runs every architecture, then one fresh
process loads all its files. Writes benchmarks/results_hf_zoo.md (architecture x checks,
totals per library and backend).

Usage: python benchmarks/hf_zoo.py [--only NAMES] [--backends B ...] [--no-write]
(T5, mT5 and LongT5 run with `hf_zoo.t5_clip_workaround`, in the fresh process too.)
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "tests" / "support"
CHECKS = ("construct", "predict", "fit", "pure_flax", "load")
ATOL = 1e-5
LIBRARIES = {"flaxlayer": ("jax", "tensorflow", "torch"), "keras": ("jax",)}
MARKER = "@@RESULT@@"
SNIPPET = "results"  # the section docs/huggingface.md includes
RAW = HERE / "results_hf_zoo.json"  # the verdicts the report is written from


# ------------------------------------------------------------------------------------ keras's


def call_hf_module(module, inputs, training=False):
    """keras.layers.FlaxLayer's `method` for a transformers module: the dict of inputs spread
    over its arguments (and `head_mask=None`, which BigBird's and RoFormer's require), the
    outputs (a ModelOutput) as plain dicts of their non-None fields."""
    import inspect

    def plain(outputs):
        if hasattr(outputs, "items"):
            return {k: plain(v) for k, v in outputs.items() if v is not None}
        return outputs

    extra = {}
    if "head_mask" in inspect.signature(module.__call__).parameters:
        extra["head_mask"] = None
    return plain(module(**inputs, **extra, deterministic=not training))


def keras_wrap(hf_model, arch):
    import keras

    import hf_zoo

    method = keras.saving.register_keras_serializable(package="hf_zoo_bench")(call_hf_module)
    return keras.layers.FlaxLayer(
        hf_model.module, method=method, variables=hf_zoo.variables_of(hf_model)
    )


def keras_flax_variables(layer):
    """keras.layers.FlaxLayer's values as Flax variables ({"params": ..., other collections})."""
    import keras

    values = layer._params_and_state_to_variables(layer.params, layer.state)
    return keras.tree.map_structure(lambda v: keras.ops.convert_to_numpy(v), values)


# ------------------------------------------------------------------------------------ ours


def ours_wrap(hf_model, arch):
    from flaxlayer import FlaxLayer

    return FlaxLayer(hf_model.module, variables=hf_model.params)


# ------------------------------------------------------------------------------------ a worker


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def run_worker(library: str, names: list[str], folder: str) -> dict:
    """Runs checks 1-4 and saves each architecture in this process, then loads every file in a
    fresh one. Returns {name: {check: "pass" | "fail: ..." | "skipped: ..."}} and seconds."""
    sys.path.insert(0, str(SUPPORT))
    import keras
    import numpy as np

    import hf_zoo

    hf_zoo.t5_clip_workaround()
    wrap = ours_wrap if library == "flaxlayer" else keras_wrap
    results, files, seconds = {}, {}, {}
    for name in names:
        start = time.perf_counter()
        arch, row = hf_zoo.ZOO[name], {}
        results[name] = row
        keras.backend.clear_session(free_memory=False)
        try:
            # keras's wrapper function supplies `head_mask=None` itself.
            run = hf_zoo.construct(arch, wrap, nones_in_dict=library == "flaxlayer")
            row["construct"] = "pass"
            diff = hf_zoo.check_predict(run)
            row["predict"] = "pass" if diff <= ATOL else f"fail: max abs diff {diff:.2e}"
            hf_zoo.check_fit(run)
            finite = bool(np.all(np.isfinite(run.history)))
            row["fit"] = (
                "pass" if finite and run.changed else f"fail: loss {run.history}, no weight moved"
            )
            variables = (
                run.layer.flax_variables
                if library == "flaxlayer"
                else keras_flax_variables(run.layer)
            )
            diff = hf_zoo.check_pure_flax(run, variables)
            row["pure_flax"] = "pass" if diff <= ATOL else f"fail: max abs diff {diff:.2e}"
            files[name] = hf_zoo.save(run, folder, name)
        except Exception as error:  # recorded: the next checks are skipped
            failed = next(c for c in CHECKS if c not in row)
            row[failed] = f"fail: {_error(error)}"
            traceback.print_exc()
        for check in CHECKS[:-1]:
            row.setdefault(check, "skipped")
        row.setdefault("load", "skipped")
        seconds[name] = time.perf_counter() - start
    if files:
        loads = _load_in_fresh_process(files, library)
        for name, result in loads.items():
            if "error" in result:
                results[name]["load"] = "fail: " + result["error"].splitlines()[0][:300]
            elif result["max_abs_diff"] > ATOL:
                results[name]["load"] = f"fail: max abs diff {result['max_abs_diff']:.2e}"
            else:
                results[name]["load"] = "pass"
    return {"results": results, "seconds": seconds}


def _load_in_fresh_process(files: dict, library: str) -> dict:
    import hf_zoo

    source = hf_zoo.load_all_source(files, clip_workaround=True)
    if library == "keras":  # the user's wrapper function, defined (and registered) first
        wrapper = textwrap.dedent(inspect.getsource(call_hf_module))
        register = (
            'keras.saving.register_keras_serializable(package="hf_zoo_bench")(call_hf_module)\n'
        )
        source = source.replace("FILES = ", wrapper + register + "FILES = ", 1)
    prelude = f"import json\ndef report(r):\n    print({MARKER!r} + json.dumps(r), flush=True)\n"
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", prelude + source], capture_output=True, text=True, env=env
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    error = {"error": f"the loading process crashed: {done.stderr[-300:]}"}
    return {name: error for name in files}


# ------------------------------------------------------------------------------------ the report


def markdown(runs: dict, names: list[str]) -> str:
    columns = [(lib, backend) for lib, backends in LIBRARIES.items() for backend in backends]
    columns = [c for c in columns if c in runs]
    head = " | ".join(f"{lib} ({backend})" for lib, backend in columns)
    lines = [
        "# The Hugging Face Flax zoo: five checks per architecture",
        "",
        "Every Flax architecture of transformers "
        f"{_version('transformers')} from a tiny config (tests/support/hf_zoo.py). Checks: "
        "1 construct, 2 `predict` equals the transformers model's call, 3 `fit` trains, "
        "4 pure Flax on the trained values, 5 the `.keras` file loads in a fresh process. "
        "flaxlayer.FlaxLayer wraps `model.module` with `variables=model.params` and no wrapper; "
        "keras.layers.FlaxLayer (JAX only) gets its documented wrapper function and "
        '`{"params": model.params}`. A cell lists the checks passed (`12345` = all).',
        "",
        f"<!-- --8<-- [start:{SNIPPET}] -->",
        _summary(runs, names, columns),
        "",
        f"| architecture | {head} |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = []
        for column in columns:
            row = runs[column]["results"].get(name, {})
            cells.append(
                "".join(str(i + 1) for i, c in enumerate(CHECKS) if row.get(c) == "pass") or "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = []
    for column in columns:
        rows = runs[column]["results"].values()
        passed = sum(row.get(c) == "pass" for row in rows for c in CHECKS)
        totals.append(f"{passed}/{len(CHECKS) * len(names)}")
    lines.append("| **checks passed** | " + " | ".join(totals) + " |")
    seconds = [f"{sum(runs[c]['seconds'].values()):.0f} s" for c in columns]
    lines.append("| time (checks 1-4) | " + " | ".join(seconds) + " |")
    lines += ["", "## Failures (the first failing check of each)", ""]
    for column in columns:
        for name in names:
            for check, verdict in runs[column]["results"].get(name, {}).items():
                if verdict.startswith("fail"):
                    lines.append(f"- {column[0]} ({column[1]}), {name}, {check}: {verdict[6:]}")
    lines.append(f"<!-- --8<-- [end:{SNIPPET}] -->")
    return "\n".join(lines) + "\n"


def _summary(runs: dict, names: list[str], columns: list) -> str:
    """One sentence: per library and backend, the architectures passing all five checks."""
    parts = []
    for library, backend in columns:
        results = runs[(library, backend)]["results"]
        whole = sum(all(results.get(n, {}).get(c) == "pass" for c in CHECKS) for n in names)
        parts.append(f"{library} on {backend}: {whole} of {len(names)}")
    return "Architectures passing all five checks: " + "; ".join(parts) + "."


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architectures (default: all)")
    parser.add_argument("--backends", nargs="*", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # LIBRARY OUTPUT.json
    args = parser.parse_args(argv)
    sys.path.insert(0, str(SUPPORT))
    import hf_zoo

    names = args.only or list(hf_zoo.ZOO)
    if args.worker:
        library, output = args.worker
        with tempfile.TemporaryDirectory() as folder:
            result = run_worker(library, names, folder)
        Path(output).write_text(json.dumps(result), encoding="utf-8")
        return 0
    runs = {}
    for library, backends in LIBRARIES.items():
        for backend in backends:
            if backend not in args.backends:
                continue
            print(f"{library} on {backend} ...", flush=True)
            with tempfile.TemporaryDirectory() as folder:
                output = os.path.join(folder, "result.json")
                env = {**os.environ, "KERAS_BACKEND": backend}
                command = [sys.executable, __file__, "--worker", library, output, "--only"]
                done = subprocess.run(command + names, env=env, capture_output=True, text=True)
                if not os.path.exists(output):
                    print(done.stderr[-3000:])
                    return 1
                runs[(library, backend)] = json.loads(Path(output).read_text(encoding="utf-8"))
    text = markdown(runs, names)
    print(text)
    if not args.no_write and not args.only:
        raw = [{"library": lib, "backend": backend, **run} for (lib, backend), run in runs.items()]
        RAW.write_text(json.dumps({"names": names, "runs": raw}, indent=1), encoding="utf-8")
        (HERE / "results_hf_zoo.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
