"""Helpers shared by several test files (fixtures live in conftest.py)."""

import json
import os
import subprocess
import sys
import textwrap

import keras

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_python(
    source: str,
    *,
    backend: str | None = None,
    timeout: float = 300,
    cwd: str | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Runs `source` in a fresh Python process (the tests folder on sys.path).

    The child uses `backend` (default: the backend of this process) and one CPU device; it
    imports nothing but what `source` imports. Returns the completed process (text output).
    """
    child_env = {**os.environ, **(env or {})}
    child_env["KERAS_BACKEND"] = backend or keras.backend.backend()
    # One CPU device (no mesh), and the suite's faster compiles.
    child_env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, child_env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env,
    )


RESULT_MARKER = "@@RESULT@@"


def run_python_json(source: str, **kwargs) -> dict:
    """Runs `source` in a fresh process; it reports by calling `report(dict)` (predefined).

    Returns that dict; fails the test with the child's output if it crashed or never reported.
    """
    prelude = (
        "import json as _json\n"
        "def report(result):\n"
        f"    print({RESULT_MARKER!r} + _json.dumps(result), flush=True)\n"
    )
    done = run_python(prelude + textwrap.dedent(source), **kwargs)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(
        f"the child process reported nothing (exit code {done.returncode}).\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"
    )


def run_python_reports(source: str, **kwargs) -> tuple[list, subprocess.CompletedProcess]:
    """Like `run_python_json`, but the child may call `report(dict)` any number of times.

    Returns every reported dict, in order, and the completed process (its exit code and full
    output). A child that reports once per step (e.g. once per file it loads) loses only the
    steps after a crash: the caller sees which step never reported.
    """
    prelude = (
        "import json as _json\n"
        "def report(result):\n"
        f"    print({RESULT_MARKER!r} + _json.dumps(result), flush=True)\n"
    )
    done = run_python(prelude + textwrap.dedent(source), **kwargs)
    reports = [
        json.loads(line[len(RESULT_MARKER) :])
        for line in done.stdout.splitlines()
        if line.startswith(RESULT_MARKER)
    ]
    return reports, done
