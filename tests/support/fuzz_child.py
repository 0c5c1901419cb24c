"""The fuzz test's child: loads each planned `.keras` file, one after the other, and reports.

Run by fuzz_kit.run_cases as `python fuzz_child.py REPORTS` with the plan's path in
FLAXLAYER_FUZZ_PLAN. It imports what a user's loading script imports (keras, flaxlayer and the
user's model file, golden_models), loads every untouched golden file once (so that what a
legitimate load imports is imported), then limits its address space to what it holds plus
FLAXLAYER_FUZZ_HEADROOM bytes, and loads the mutated files. One JSON line per file goes to REPORTS.
"""

import contextlib
import io
import json
import os
import re
import resource
import sys
import time
import traceback
import warnings

import golden_models  # noqa: F401 - the user's model file
import keras
import numpy as np

import flaxlayer
import load_probe

FLAXLAYER_DIR = os.path.dirname(flaxlayer.__file__)
#: Keras's wrapper around an error raised while a layer read the weights file.
KERAS_WEIGHTS_WRAPPER = "could not be loaded"


def _inputs(base: str) -> np.ndarray:
    return np.load(os.path.join(os.environ["FLAXLAYER_FUZZ_INPUTS"], f"{base}.npz"))["x"]


def _chain(error: BaseException):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _ran_flaxlayer(errors: list) -> bool:
    """Whether a frame of flaxlayer's code is in the traceback of any error of the chain."""
    for error in errors:
        for frame in traceback.extract_tb(error.__traceback__):
            if frame.filename.startswith(FLAXLAYER_DIR):
                return True
    return False


def _quotes_a_refusal(error: BaseException) -> bool:
    """Keras's ValueError for the weights stage (`load_own_variables` failed): it quotes the
    layer's error, which names the layer as flaxlayer's messages do, without chaining it."""
    message = str(error)
    return (
        type(error) is ValueError
        and KERAS_WEIGHTS_WRAPPER in message
        and re.search(r"\n(FlaxLayer|JaxLayer) '[^']*': ", message) is not None
    )


def _load(path: str, x: np.ndarray) -> dict:
    model = keras.saving.load_model(path, compile=False)
    try:
        y = np.asarray(model.predict(x, verbose=0), "float64")
    except Exception as e:
        return {"loaded": True, "finite": False, "predict_error": f"{type(e).__name__}: {e}"}
    return {"loaded": True, "finite": bool(np.isfinite(y).all())}


def _attempt(case: dict, x: np.ndarray, watched: list[str]) -> dict:
    snapshot, before = load_probe.snapshot(), load_probe.observe()
    modules = set(sys.modules)
    files = {d: set(os.listdir(d)) for d in watched}
    reset = load_probe.reset_peak()
    base = load_probe.status_kib("VmRSS") if reset else load_probe.peak_kib()
    start = time.perf_counter()
    result: dict = {"name": case["name"]}
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result.update(_load(case["path"], x))
    except Exception as e:
        errors = _chain(e)
        result.update(
            loaded=False,
            error_type=f"{type(e).__module__}.{type(e).__name__}",
            error=str(e)[:2000],
            root=f"{type(errors[-1]).__name__}: {str(errors[-1])[:300]}",
            serialization_error=any(isinstance(c, flaxlayer.SerializationError) for c in errors),
            weights_refusal=_quotes_a_refusal(e),
            keras_before_flaxlayer=not (_ran_flaxlayer(errors) or _quotes_a_refusal(e)),
        )
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_rise_mib"] = round((load_probe.peak_kib() - base) / 1024, 1)
    result["new_modules"] = sorted(set(sys.modules) - modules)
    result["changed"] = sorted(k for k, v in load_probe.observe().items() if before[k] != v)
    result["written"] = sorted(
        os.path.join(d, f) for d in watched for f in set(os.listdir(d)) - files[d]
    )
    load_probe.restore(snapshot)
    keras.backend.clear_session(free_memory=False)
    return result


def _warm_up(bases: set[str]) -> None:
    """Loads and runs every untouched base file: a legitimate load's imports are done."""
    folder = os.environ["FLAXLAYER_FUZZ_INPUTS"]
    for base in sorted(bases):
        with contextlib.redirect_stdout(io.StringIO()):
            _load(os.path.join(folder, f"{base}.keras"), _inputs(base))
        keras.backend.clear_session(free_memory=False)


def _limit_address_space() -> None:
    held = load_probe.status_kib("VmSize")
    if held is not None:
        limit = held * 1024 + int(os.environ["FLAXLAYER_FUZZ_HEADROOM"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    with open(os.environ["FLAXLAYER_FUZZ_PLAN"]) as f:
        cases = json.load(f)
    inputs = {base: _inputs(base) for base in {c["base"] for c in cases}}
    _warm_up(set(inputs))
    _limit_address_space()
    watched = [os.getcwd(), os.path.dirname(cases[0]["path"]) if cases else os.getcwd()]
    with open(sys.argv[1], "a") as reports:
        reports.write(json.dumps({"ready": True}) + "\n")
        reports.flush()
        for case in cases:
            result = _attempt(case, inputs[case["base"]], watched)
            reports.write(json.dumps(result) + "\n")
            reports.flush()


if __name__ == "__main__":
    main()
